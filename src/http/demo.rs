//! The demo page (`GET /`), its icon (`GET /favicon.ico`, which every browser asks for) and the
//! one question it asks the server (`POST /demo/check`).
//!
//! The page is served with a few facts about the server in it, so that it can show a `curl`
//! that works against this server and watch what matters in its mode: whether `/api/*` needs
//! an API key, whether clients need a token, whether the node runs in cluster mode. Only these
//! booleans: never a key, a secret or the list of allowed origins.
//!
//! A browser cannot read why a WebSocket upgrade was refused (the `401` or `403` is hidden
//! from the page), so after a failed connect the page asks `POST /demo/check` with the query
//! and token it connected with: the check runs what the upgrade runs after the handshake (the
//! `Origin`, which a browser sends on a `POST`, the token, the query, the channels the token
//! grants) and answers with the status and JSON error the upgrade was refused with, or `200
//! {"status":"ok"}`. A non-browser client learns all of that from `/ws` itself; the check
//! tells the page no more.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::upgrade::{self, Endpoint};
use super::{AppState, HttpError, access, json_response, text_response};

const PAGE: &str = include_str!("demo.html");

/// A blue square with an "H".
const ICON: &str = concat!(
    r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">"##,
    r##"<rect width="32" height="32" rx="7" fill="#3563e9"/>"##,
    r##"<path d="M10 8v16M22 8v16M10 16h12" stroke="#fff" stroke-width="4" stroke-linecap="round"/>"##,
    "</svg>",
);

/// Where the page carries its server facts: a JSON script element, filled in per request.
const CONFIG_SLOT: &str = r#"<script type="application/json" id="herald-config">{}</script>"#;

/// Answers `/`, `/favicon.ico` and `/demo/check`.
///
/// # Errors
/// [`HttpError::MethodNotAllowed`] for a method the route does not take.
pub fn route(
    req: &Request<Incoming>,
    state: &Arc<AppState>,
) -> Result<Response<Full<Bytes>>, HttpError> {
    match (req.uri().path(), req.method()) {
        ("/", &Method::GET) => Ok(page(state)),
        ("/favicon.ico", &Method::GET) => Ok(icon()),
        ("/demo/check", &Method::POST) => Ok(check(req, state)),
        ("/demo/check", _) => Err(HttpError::MethodNotAllowed { allow: "POST" }),
        _ => Err(HttpError::MethodNotAllowed { allow: "GET" }),
    }
}

/// `GET /`: the page, with the server facts it needs.
fn page(state: &AppState) -> Response<Full<Bytes>> {
    let facts = json!({
        "api_key_required": !state.config.api_keys.is_empty(),
        "jwt_auth": state.verifier.is_some(),
        "cluster": state.config.redis.is_some(),
    });
    let filled = format!(r#"<script type="application/json" id="herald-config">{facts}</script>"#);
    text_response(
        "text/html; charset=utf-8",
        PAGE.replacen(CONFIG_SLOT, &filled, 1),
    )
}

/// `GET /favicon.ico`: the page's icon, an SVG.
fn icon() -> Response<Full<Bytes>> {
    text_response("image/svg+xml", ICON)
}

/// `POST /demo/check?<the /ws query>`: whether `/ws` would take this client now, and if not,
/// the reply it was refused with.
fn check(req: &Request<Incoming>, state: &Arc<AppState>) -> Response<Full<Bytes>> {
    let query = req.uri().query().unwrap_or("");
    let verdict = access::check_origin(req.headers(), &state.config.allowed_origins)
        .and_then(|()| upgrade::admit(state, req.headers(), query, Endpoint::Notify));
    match verdict {
        Ok(_) => json_response(StatusCode::OK, &json!({"status": "ok"})),
        Err(err) => HttpError::into_response(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_one_config_slot() {
        assert_eq!(PAGE.matches(CONFIG_SLOT).count(), 1);
    }
}
