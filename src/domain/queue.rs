//! Where a proposal stands in its Safe's queue, as Safe{Wallet} orders it:
//! by nonce, lowest first. Only the transaction at the Safe's current nonce
//! can execute, and only with its threshold of signatures; everything above
//! waits for it. A pure function of facts the store keeps.

/// One open proposal, as its queue position needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queued {
    pub nonce: u64,
    pub confirmations: u32,
    pub threshold: Option<u32>,
    /// Some request it serves is neither cancelled nor failed.
    pub serves_request: bool,
    /// An owner (not the bridge) has signed it.
    pub signed_by_owner: bool,
    /// Its execution was seen; it waits for block confirmations.
    pub executed: bool,
}

/// A lower nonce whose proposals all serve no request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stuck {
    pub nonce: u64,
    /// An owner signed one of them: only an on-chain rejection clears it.
    pub signed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Executed; waiting for block confirmations.
    Executed,
    /// The Safe's next nonce, with its threshold: the owners can execute it.
    Ready,
    /// The Safe's next nonce, short of `missing` signatures.
    Next { missing: Option<u32> },
    /// Nonce `by` (the Safe's current one) must be executed or rejected
    /// first; `stuck`: the lowest nonce on the way whose proposals serve no
    /// request.
    Blocked { by: u64, stuck: Option<Stuck> },
    /// The Safe has used its nonce already: the follower is settling it.
    NonceUsed { safe_nonce: u64 },
    /// The Safe's nonce has not been read yet.
    Unknown,
}

/// Where `tx` stands, with the Safe at `safe_nonce` and `queue` the Safe's
/// open proposals (`tx` among them).
pub fn mark(tx: &Queued, safe_nonce: Option<u64>, queue: &[Queued]) -> Mark {
    if tx.executed {
        return Mark::Executed;
    }
    let Some(safe_nonce) = safe_nonce else {
        return Mark::Unknown;
    };
    if tx.nonce < safe_nonce {
        return Mark::NonceUsed { safe_nonce };
    }
    if tx.nonce == safe_nonce {
        let missing = tx.threshold.map(|t| t.saturating_sub(tx.confirmations));
        return match missing {
            Some(0) => Mark::Ready,
            missing => Mark::Next { missing },
        };
    }
    let stuck = (safe_nonce..tx.nonce).find_map(|nonce| {
        let at: Vec<&Queued> = queue.iter().filter(|q| q.nonce == nonce).collect();
        let dead = !at.is_empty() && at.iter().all(|q| !q.serves_request && !q.executed);
        dead.then(|| Stuck {
            nonce,
            signed: at.iter().any(|q| q.signed_by_owner),
        })
    });
    Mark::Blocked {
        by: safe_nonce,
        stuck,
    }
}

impl Mark {
    /// A short phrase for the page and the API.
    pub fn label(&self) -> String {
        match self {
            Mark::Executed => "executed; waiting for block confirmations".to_owned(),
            Mark::Ready => "ready to execute".to_owned(),
            Mark::Next { missing: Some(1) } => "next; needs 1 more signature".to_owned(),
            Mark::Next { missing: Some(n) } => format!("next; needs {n} more signatures"),
            Mark::Next { missing: None } => "next; waiting for the owners".to_owned(),
            Mark::Blocked { by, stuck: None } => format!("blocked by nonce {by}"),
            Mark::Blocked {
                by,
                stuck:
                    Some(Stuck {
                        nonce,
                        signed: true,
                    }),
            } => format!(
                "blocked by nonce {by}: nonce {nonce} serves no request, and an owner must reject it in Safe{{Wallet}} first"
            ),
            Mark::Blocked {
                by,
                stuck:
                    Some(Stuck {
                        nonce,
                        signed: false,
                    }),
            } => format!(
                "blocked by nonce {by}: nonce {nonce} serves no request, and the bridge withdraws it"
            ),
            Mark::NonceUsed { safe_nonce } => {
                format!("the Safe is at nonce {safe_nonce} already; settling what became of it")
            }
            Mark::Unknown => "the Safe's nonce is not read yet".to_owned(),
        }
    }

    /// A stable one-word kind, for styling and tests.
    pub fn kind(&self) -> &'static str {
        match self {
            Mark::Executed => "executed",
            Mark::Ready => "ready",
            Mark::Next { .. } => "next",
            Mark::Blocked { .. } => "blocked",
            Mark::NonceUsed { .. } => "used",
            Mark::Unknown => "unknown",
        }
    }
}

/// What happens to a proposal whose requests were all cancelled or failed,
/// and what the owners can do, in words.
pub fn serves_no_request_advice(nonce: u64, signed_by_owner: bool) -> String {
    if signed_by_owner {
        format!(
            "It serves no request: every request it served was cancelled or failed. An owner has \
             signed it, so it stays in the Safe's queue and holds nonce {nonce}. To clear it, an \
             owner opens it in Safe{{Wallet}} and chooses Reject: that proposes an on-chain \
             rejection (a transaction that does nothing) at nonce {nonce}; the owners sign and \
             execute it, and the transactions behind it move up."
        )
    } else {
        format!(
            "It serves no request: every request it served was cancelled or failed. No owner has \
             signed it, so the bridge deletes it from the Safe Transaction Service and gives \
             nonce {nonce} to the next batch."
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(nonce: u64, confirmations: u32, serves: bool, signed: bool) -> Queued {
        Queued {
            nonce,
            confirmations,
            threshold: Some(2),
            serves_request: serves,
            signed_by_owner: signed,
            executed: false,
        }
    }

    #[test]
    fn only_the_safes_nonce_with_its_threshold_is_ready() {
        let four = q(4, 0, true, false);
        let five = q(5, 2, true, true);
        let queue = [four, five];
        assert_eq!(
            mark(&five, Some(4), &queue),
            Mark::Blocked { by: 4, stuck: None }
        );
        assert_eq!(mark(&five, Some(4), &queue).label(), "blocked by nonce 4");
        assert_eq!(
            mark(&four, Some(4), &queue),
            Mark::Next { missing: Some(2) }
        );
        assert_eq!(mark(&five, Some(5), &queue), Mark::Ready);
        assert_eq!(
            mark(&four, Some(5), &queue),
            Mark::NonceUsed { safe_nonce: 5 }
        );
        assert_eq!(mark(&five, None, &queue), Mark::Unknown);
        let executed = Queued {
            executed: true,
            ..five
        };
        assert_eq!(mark(&executed, Some(4), &queue), Mark::Executed);
        let no_threshold = Queued {
            threshold: None,
            ..four
        };
        assert_eq!(
            mark(&no_threshold, Some(4), &[]),
            Mark::Next { missing: None }
        );
    }

    #[test]
    fn a_lower_nonce_that_serves_no_request_is_named() {
        let dead_signed = q(4, 1, false, true);
        let dead_unsigned = q(4, 0, false, false);
        let five = q(5, 2, true, true);
        assert_eq!(
            mark(&five, Some(4), &[dead_signed, five]),
            Mark::Blocked {
                by: 4,
                stuck: Some(Stuck {
                    nonce: 4,
                    signed: true
                })
            }
        );
        assert!(
            mark(&five, Some(4), &[dead_signed, five])
                .label()
                .contains("must reject it in Safe{Wallet}")
        );
        assert!(
            mark(&five, Some(4), &[dead_unsigned, five])
                .label()
                .contains("the bridge withdraws it")
        );
        // A live proposal beside the dead one at that nonce: nothing is stuck.
        let live = q(4, 0, true, false);
        assert_eq!(
            mark(&five, Some(4), &[dead_signed, live, five]),
            Mark::Blocked { by: 4, stuck: None }
        );
    }

    #[test]
    fn the_advice_says_delete_or_reject() {
        assert!(serves_no_request_advice(4, false).contains("deletes it"));
        assert!(serves_no_request_advice(4, true).contains("Reject"));
    }
}
