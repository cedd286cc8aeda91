//! The per-connection limit on publishes from a client: a token bucket.
//!
//! A client may publish (or send) `rate` messages a second on average, with bursts of up to
//! `rate` at once. A request over the limit is refused with a `rate_limited` error frame; a
//! client that is refused a whole second's worth of requests without slowing down is closed
//! with 1008.

/// One connection's token bucket. 16 bytes, kept in every connection.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    tokens: f32,
    /// Requests refused since the last one allowed.
    strikes: u32,
    /// When the bucket was last refilled (registry clock, ms).
    refilled_ms: u64,
}

/// What the bucket says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead.
    Allowed,
    /// Refuse this request; the connection may go on.
    Refused,
    /// Refused, and the client keeps going: close the connection.
    Exceeded,
}

impl RateLimit {
    /// A full bucket for a connection opened at `now_ms`.
    pub fn new(rate: u32, now_ms: u64) -> Self {
        Self {
            tokens: rate as f32,
            strikes: 0,
            refilled_ms: now_ms,
        }
    }

    /// Takes a token for one request at `now_ms`. A `rate` of 0 means no limit.
    pub fn check(&mut self, rate: u32, now_ms: u64) -> Verdict {
        if rate == 0 {
            return Verdict::Allowed;
        }
        let elapsed_s = now_ms.saturating_sub(self.refilled_ms) as f32 / 1000.0;
        self.refilled_ms = now_ms;
        self.tokens = (self.tokens + elapsed_s * rate as f32).min(rate as f32);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.strikes = 0;
            return Verdict::Allowed;
        }
        self.strikes += 1;
        if self.strikes >= rate {
            Verdict::Exceeded
        } else {
            Verdict::Refused
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refuses_then_refills() {
        let mut limit = RateLimit::new(5, 0);
        for _ in 0..5 {
            assert_eq!(limit.check(5, 0), Verdict::Allowed);
        }
        assert_eq!(limit.check(5, 0), Verdict::Refused);
        assert_eq!(
            limit.check(5, 200),
            Verdict::Allowed,
            "200 ms refill one token at 5/s"
        );
        assert_eq!(limit.check(5, 200), Verdict::Refused);
    }

    #[test]
    fn a_client_that_keeps_going_is_exceeded() {
        let mut limit = RateLimit::new(3, 0);
        let verdicts: Vec<_> = (0..6).map(|_| limit.check(3, 0)).collect();
        assert_eq!(
            verdicts,
            [
                Verdict::Allowed,
                Verdict::Allowed,
                Verdict::Allowed,
                Verdict::Refused,
                Verdict::Refused,
                Verdict::Exceeded
            ]
        );
        assert_eq!(
            RateLimit::new(0, 0).check(0, 0),
            Verdict::Allowed,
            "0: unlimited"
        );
    }
}
