//! The query of `GET /api/history/{channel}` (`herald::http::parse_history_query`), on
//! arbitrary bytes.
//!
//! Properties:
//! - it never panics;
//! - on `Ok` the limit is between 1 and `HISTORY_PAGE_MAX`, and a position was read exactly
//!   when both `since` and `epoch` were given, once each, with no other parameter;
//! - what it accepts means the same when written back canonically: formatting the result as
//!   a query and parsing that gives the same result.
#![no_main]

use herald::http::{HISTORY_PAGE_MAX, parse_history_query};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((since, limit)) = parse_history_query(query) else {
        return;
    };
    assert!((1..=HISTORY_PAGE_MAX).contains(&limit), "limit {limit}");
    let keys: Vec<String> = form_urlencoded::parse(query.as_bytes())
        .map(|(key, _)| key.into_owned())
        .collect();
    for key in &keys {
        assert!(["since", "epoch", "limit"].contains(&key.as_str()), "{key:?} accepted");
        assert_eq!(keys.iter().filter(|k| *k == key).count(), 1, "{key:?} twice");
    }
    assert_eq!(
        since.is_some(),
        keys.iter().any(|k| k == "since") && keys.iter().any(|k| k == "epoch")
    );
    let mut canonical = format!("limit={limit}");
    if let Some(position) = since {
        canonical.push_str(&format!("&since={}&epoch={}", position.offset, position.epoch));
    }
    assert_eq!(
        parse_history_query(&canonical).ok(),
        Some((since, limit)),
        "{canonical}"
    );
});
