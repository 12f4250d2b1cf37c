//! When a cached policy applies, and when the policy is fetched again (RFC 8461 §3.3,
//! §5.1, §10.2): a pure decision from the cached policy, this delivery's TXT lookup and
//! the time, so that every rule is a table test and no test sleeps.
//!
//! The rules, each with where it comes from:
//! - A cached policy is valid until `max_age` after its fetch (§3.2); an expired one is
//!   never applied and is forgotten.
//! - A TXT record whose id differs from the cached policy's means a new policy: fetch it
//!   (§3.1: the id uniquely identifies an instance of a policy; §5.1 step 3).
//! - While the cached policy is valid, it applies whenever no live policy can be had:
//!   the TXT lookup failed, found no usable record, or the fetch of a new one failed
//!   (§3.3: "if no 'live' policy can be discovered via DNS or fetched via HTTPS, but a
//!   valid (non-expired) policy exists in the sender's cache, the sender MUST apply that
//!   cached policy"; §3.1 and §5.1: the absence of a TXT record alone does not remove a
//!   cached policy). This is what resists an attacker who blocks DNS (§10.2): the
//!   window they can use is the time without any cached policy.
//! - With nothing valid cached, a TXT record means fetch, and a failed fetch means no
//!   policy (§3.3: "continue with delivery as though the domain has not implemented
//!   MTA-STS"); no usable record means no policy.
//! - A valid policy under an unchanged id is fetched again once it is a day old, so that
//!   it does not lapse while the domain still publishes it (§3.3: MTAs SHOULD refresh
//!   cached policies before they expire, once per day suggested; §10.2). A failed
//!   refresh keeps the cached policy.
//!
//! A policy in mode `none` is cached and decided on like any other; applying it means
//! applying no policy (§5).

use std::time::{Duration, SystemTime};

use super::policy::Policy;
use super::record::{self, PolicyId, Record};

/// How old a valid policy may grow before it is fetched again under an unchanged id
/// (§3.3 suggests once per day).
pub const REFRESH_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// A policy as the cache holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    /// The id of the TXT record under which it was fetched.
    pub id: PolicyId,
    /// When it was fetched.
    pub fetched_at: SystemTime,
    /// The policy.
    pub policy: Policy,
}

impl Cached {
    /// Time since the fetch; zero if the clock now reads earlier than the fetch.
    pub fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.fetched_at).unwrap_or_default()
    }

    /// Whether `max_age` has run out (§3.2). A fetch time further in the future than
    /// `max_age` counts as expired too: the clock was set back by more than a policy's
    /// life, or the time is bogus, and either way it says nothing about the policy's age.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        let max_age = self.policy.max_age;
        match now.duration_since(self.fetched_at) {
            Ok(age) => age >= max_age,
            Err(ahead) => ahead.duration() > max_age,
        }
    }
}

/// What the TXT lookup for `_mta-sts.<domain>` gave on this delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxtLookup {
    /// One valid record with this id.
    Found(PolicyId),
    /// No usable record: none at the name, none beginning with `v=STSv1`, several, or a
    /// malformed one (§3.1 treats them alike).
    NoRecord,
    /// The lookup itself failed (timeout, SERVFAIL).
    Failed,
}

impl TxtLookup {
    /// The lookup's meaning, from what [`record::parse_records`] made of the TXT strings.
    pub fn from_records(parsed: Result<Option<Record>, record::Error>) -> TxtLookup {
        match parsed {
            Ok(Some(record)) => TxtLookup::Found(record.id),
            Ok(None) | Err(_) => TxtLookup::NoRecord,
        }
    }
}

/// Why a policy is to be fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchReason {
    /// Nothing is cached for the domain.
    NotCached,
    /// The cached policy has expired.
    Expired,
    /// The TXT record's id is not the cached policy's.
    NewId,
    /// The cached policy is valid but [`REFRESH_AFTER`] old.
    Refresh,
}

/// What applies when the fetch fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFetchFailure {
    /// The cached policy, which is still valid.
    UseCached,
    /// No policy; `forget_cached`: the cached one has expired, remove it.
    NoPolicy {
        /// Remove the expired cached policy.
        forget_cached: bool,
    },
}

/// What to do for this delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Apply the cached policy.
    UseCached,
    /// Fetch the policy. A fetched policy replaces the cache entry (under the TXT
    /// record's id, fetched now) and applies; if the fetch fails, `on_failure` applies.
    Fetch {
        /// Why.
        reason: FetchReason,
        /// What applies if the fetch fails.
        on_failure: OnFetchFailure,
    },
    /// No policy applies: deliver as if the domain had not implemented MTA-STS (§3.3).
    NoPolicy {
        /// The cached policy has expired: remove it.
        forget_cached: bool,
    },
}

/// Decides, for one delivery to the domain, from its cached policy (if any), this
/// delivery's TXT lookup and the time.
pub fn decide(cached: Option<&Cached>, txt: &TxtLookup, now: SystemTime) -> Decision {
    let expired = cached.is_some_and(|c| c.is_expired(now));
    match (cached.filter(|_| !expired), txt) {
        (Some(valid), TxtLookup::Found(id)) if *id != valid.id => Decision::Fetch {
            reason: FetchReason::NewId,
            on_failure: OnFetchFailure::UseCached,
        },
        (Some(valid), TxtLookup::Found(_)) if valid.age(now) >= REFRESH_AFTER => Decision::Fetch {
            reason: FetchReason::Refresh,
            on_failure: OnFetchFailure::UseCached,
        },
        (Some(_), _) => Decision::UseCached,
        (None, TxtLookup::Found(_)) => Decision::Fetch {
            reason: if expired {
                FetchReason::Expired
            } else {
                FetchReason::NotCached
            },
            on_failure: OnFetchFailure::NoPolicy {
                forget_cached: expired,
            },
        },
        (None, TxtLookup::NoRecord | TxtLookup::Failed) => Decision::NoPolicy {
            forget_cached: expired,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::super::name::MxPattern;
    use super::super::policy::Mode;
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);
    const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn id(s: &str) -> PolicyId {
        PolicyId::parse(s).unwrap()
    }

    /// A week-long enforce policy fetched at `t(0)` under id `a`.
    fn cached() -> Cached {
        Cached {
            id: id("a"),
            fetched_at: t(0),
            policy: Policy {
                mode: Mode::Enforce,
                max_age: WEEK,
                mx: vec![MxPattern::parse("mx.example.com").unwrap()],
            },
        }
    }

    /// Fetch, keeping the cached policy if that fails.
    fn fetch_keep(reason: FetchReason) -> Decision {
        Decision::Fetch {
            reason,
            on_failure: OnFetchFailure::UseCached,
        }
    }

    #[test]
    fn the_refresh_rules_of_rfc_8461() {
        let found_a = TxtLookup::Found(id("a"));
        let found_b = TxtLookup::Found(id("b"));
        let valid = t(WEEK.as_secs() - 1);
        let expired = t(WEEK.as_secs());
        let c = cached();
        let table: &[(&str, Option<&Cached>, &TxtLookup, SystemTime, Decision)] = &[
            // Nothing cached: a record means fetch; nothing to fall back on.
            (
                "not cached, record",
                None,
                &found_a,
                t(0),
                Decision::Fetch {
                    reason: FetchReason::NotCached,
                    on_failure: OnFetchFailure::NoPolicy {
                        forget_cached: false,
                    },
                },
            ),
            (
                "not cached, no record",
                None,
                &TxtLookup::NoRecord,
                t(0),
                Decision::NoPolicy {
                    forget_cached: false,
                },
            ),
            (
                "not cached, lookup failed",
                None,
                &TxtLookup::Failed,
                t(0),
                Decision::NoPolicy {
                    forget_cached: false,
                },
            ),
            // Valid, same id, fresh: used as it is.
            (
                "same id",
                Some(&c),
                &found_a,
                t(HOUR.as_secs()),
                Decision::UseCached,
            ),
            // A new id: fetch, and keep the cached one if that fails (§3.3).
            (
                "new id",
                Some(&c),
                &found_b,
                t(HOUR.as_secs()),
                fetch_keep(FetchReason::NewId),
            ),
            (
                "new id, last second",
                Some(&c),
                &found_b,
                valid,
                fetch_keep(FetchReason::NewId),
            ),
            // The record disappears or DNS fails: the valid policy still applies (§3.1,
            // §3.3, §10.2), to its last second.
            (
                "record gone",
                Some(&c),
                &TxtLookup::NoRecord,
                t(HOUR.as_secs()),
                Decision::UseCached,
            ),
            (
                "lookup failed",
                Some(&c),
                &TxtLookup::Failed,
                t(HOUR.as_secs()),
                Decision::UseCached,
            ),
            (
                "record gone, last second",
                Some(&c),
                &TxtLookup::NoRecord,
                valid,
                Decision::UseCached,
            ),
            (
                "lookup failed, last second",
                Some(&c),
                &TxtLookup::Failed,
                valid,
                Decision::UseCached,
            ),
            // Expired: never applied, forgotten; a record means fetch with nothing to
            // fall back on.
            (
                "expired, no record",
                Some(&c),
                &TxtLookup::NoRecord,
                expired,
                Decision::NoPolicy {
                    forget_cached: true,
                },
            ),
            (
                "expired, lookup failed",
                Some(&c),
                &TxtLookup::Failed,
                expired,
                Decision::NoPolicy {
                    forget_cached: true,
                },
            ),
            (
                "expired, same id",
                Some(&c),
                &found_a,
                expired,
                Decision::Fetch {
                    reason: FetchReason::Expired,
                    on_failure: OnFetchFailure::NoPolicy {
                        forget_cached: true,
                    },
                },
            ),
            (
                "expired, new id",
                Some(&c),
                &found_b,
                expired,
                Decision::Fetch {
                    reason: FetchReason::Expired,
                    on_failure: OnFetchFailure::NoPolicy {
                        forget_cached: true,
                    },
                },
            ),
            // A day old under the same id: refreshed, and kept if the refresh fails.
            (
                "same id, a day old",
                Some(&c),
                &found_a,
                t(REFRESH_AFTER.as_secs()),
                fetch_keep(FetchReason::Refresh),
            ),
            (
                "same id, just under a day",
                Some(&c),
                &found_a,
                t(REFRESH_AFTER.as_secs() - 1),
                Decision::UseCached,
            ),
            // No refresh without a record: nothing says the policy is still published,
            // and nothing says it is not.
            (
                "a day old, record gone",
                Some(&c),
                &TxtLookup::NoRecord,
                t(REFRESH_AFTER.as_secs()),
                Decision::UseCached,
            ),
        ];
        for &(what, cached, txt, now, want) in table {
            assert_eq!(decide(cached, txt, now), want, "{what}");
        }
    }

    #[test]
    fn max_age_zero_is_never_applied_from_the_cache() {
        let mut c = cached();
        c.policy.max_age = Duration::ZERO;
        assert!(c.is_expired(t(0)));
        assert_eq!(
            decide(Some(&c), &TxtLookup::Failed, t(0)),
            Decision::NoPolicy {
                forget_cached: true
            }
        );
    }

    #[test]
    fn a_clock_set_back_keeps_the_policy_but_a_fetch_time_beyond_its_life_does_not() {
        let c = cached();
        // The clock reads an hour before the fetch: age zero, valid.
        let back = c.fetched_at - HOUR;
        assert_eq!(c.age(back), Duration::ZERO);
        assert!(!c.is_expired(back));
        assert_eq!(
            decide(Some(&c), &TxtLookup::Failed, back),
            Decision::UseCached
        );
        // A fetch time more than max_age ahead of the clock cannot be trusted.
        let far_back = c.fetched_at - WEEK - Duration::from_secs(1);
        assert!(c.is_expired(far_back));
        assert_eq!(
            decide(Some(&c), &TxtLookup::Failed, far_back),
            Decision::NoPolicy {
                forget_cached: true
            }
        );
    }

    #[test]
    fn any_unusable_record_is_no_record() {
        assert_eq!(
            TxtLookup::from_records(record::parse_records(&["v=STSv1; id=x"])),
            TxtLookup::Found(id("x"))
        );
        let none: [&str; 0] = [];
        for parsed in [
            record::parse_records(&none),
            record::parse_records(&["v=STSv1; id=x", "v=STSv1; id=y"]),
            record::parse_records(&["v=STSv1; id=x-y"]),
        ] {
            assert_eq!(TxtLookup::from_records(parsed), TxtLookup::NoRecord);
        }
    }
}
