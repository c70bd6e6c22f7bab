//! How the team page words what the API gives in machine terms: people by
//! name ("you" for the signed-in person, a configured name, else a short
//! address with the full one a copy away), times relative with their
//! absolute UTC time, statuses in plain words with what happens next, and
//! error messages without JSON field names.

use alloy::primitives::Address;
use chrono::{DateTime, Utc};

use crate::chain::{ChainClient, EnsNames};
use crate::config::Names;
use crate::domain::Status;

/// One address or caller as the page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    /// "you", a configured name, or what the caller is ("API token ops").
    pub name: Option<String>,
    /// The short address (`0x1234…abcd`), for an address.
    pub short: Option<String>,
    /// The full value: what the copy button copies and the title shows.
    pub full: String,
    pub you: bool,
}

impl Person {
    /// In running text: the name, else the short address.
    pub fn word(&self) -> String {
        self.name
            .clone()
            .or_else(|| self.short.clone())
            .unwrap_or_else(|| self.full.clone())
    }
}

/// `0x1234…abcd` for long hex; anything else as it is.
pub fn short_hex(full: &str) -> String {
    if full.starts_with("0x") && full.len() > 14 && full.is_ascii() {
        format!("{}…{}", &full[..6], &full[full.len() - 4..])
    } else {
        full.to_owned()
    }
}

/// Names people for one viewer.
#[derive(Debug, Clone)]
pub struct People {
    names: Names,
    viewer: Option<String>,
    /// ENS names from the cache, of these chains (first verified name wins).
    ens: Option<(EnsNames, Vec<ChainClient>)>,
}

impl People {
    pub fn new(names: &Names, viewer: Option<&str>) -> People {
        People {
            names: names.clone(),
            viewer: viewer.map(str::to_owned),
            ens: None,
        }
    }

    /// Also names addresses by their verified ENS name on `chains`, where
    /// no name is configured.
    pub fn with_ens(mut self, ens: &EnsNames, chains: Vec<ChainClient>) -> People {
        self.ens = Some((ens.clone(), chains));
        self
    }

    fn ens_name(&self, address: Address) -> Option<String> {
        let (ens, chains) = self.ens.as_ref()?;
        chains.iter().find_map(|chain| ens.name(chain, address))
    }

    fn is_viewer(&self, who: &str) -> bool {
        let Some(viewer) = &self.viewer else {
            return false;
        };
        match (who.parse::<Address>(), viewer.parse::<Address>()) {
            (Ok(a), Ok(b)) => a == b,
            _ => who == viewer,
        }
    }

    /// An address or an SSO user name.
    pub fn person(&self, who: &str) -> Person {
        let you = self.is_viewer(who);
        let name = if you {
            Some("you".to_owned())
        } else {
            self.names.of(who).map(str::to_owned)
        };
        match who.parse::<Address>() {
            Ok(address) => {
                let full = address.to_checksum(None);
                Person {
                    // Configured names win over ENS.
                    name: name.or_else(|| self.ens_name(address)),
                    short: Some(short_hex(&full)),
                    full,
                    you,
                }
            }
            Err(_) => Person {
                name: Some(name.unwrap_or_else(|| who.to_owned())),
                short: None,
                full: who.to_owned(),
                you,
            },
        }
    }

    /// An actor of the event log (`web:0x…`, `api:ops`, `ci:github`, `worker`).
    pub fn actor(&self, actor: &str) -> Person {
        let said = |name: String| Person {
            name: Some(name),
            short: None,
            full: actor.to_owned(),
            you: false,
        };
        match actor.split_once(':') {
            Some(("web", who)) => self.person(who),
            Some(("api", token)) => said(format!("API token {token}")),
            Some(("ci", client)) => said(format!("CI client {client}")),
            _ if actor == "worker" => said("the bridge".to_owned()),
            _ => said(actor.to_owned()),
        }
    }
}

/// A time as the page shows it: "3 min ago", with the absolute time in UTC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moment {
    /// RFC 3339, for `<time datetime>`.
    pub iso: String,
    /// "2026-12-07 21:03:10 UTC".
    pub absolute: String,
    pub ago: String,
}

impl Moment {
    pub fn new(at: DateTime<Utc>, now: DateTime<Utc>) -> Moment {
        Moment {
            iso: at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            absolute: at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
            ago: ago(at, now),
        }
    }
}

fn ago(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - at).num_seconds();
    // A clock a little ahead of ours is still "just now".
    match secs {
        ..10 => "just now".to_owned(),
        10..60 => format!("{secs} s ago"),
        60..3_600 => format!("{} min ago", secs / 60),
        3_600..86_400 => format!("{} h ago", secs / 3_600),
        86_400..172_800 => "yesterday".to_owned(),
        _ => format!("{} days ago", secs / 86_400),
    }
}

/// A status in plain words, and what happens next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusWords {
    pub label: &'static str,
    pub next_step: &'static str,
}

pub fn status_words(status: Status) -> StatusWords {
    let (label, next_step) = match status {
        Status::Queued => (
            "Queued",
            "Next: the bridge asks Phala to prepare the replica.",
        ),
        Status::Preparing => (
            "Preparing",
            "Next: Phala prepares the replica, and the bridge checks what the app's contract must allow.",
        ),
        Status::AwaitingProposal => (
            "Waiting for a Safe batch",
            "Next: the bridge proposes what the app's contract must allow to the Safe, with the next batch.",
        ),
        Status::AwaitingApproval => (
            "Waiting for the owners",
            "Next: the owners sign in Safe{Wallet}, someone executes it, and once the execution has its block confirmations the bridge commits the replica.",
        ),
        Status::Committing => (
            "Committing",
            "Next: Phala accepts the commit and the replica boots.",
        ),
        Status::Provisioning => (
            "Booting",
            "Next: the replica boots; the request is done once it runs.",
        ),
        Status::Done => ("Done", "The replica runs; nothing is left to do."),
        Status::Failed => (
            "Failed",
            "Nothing more happens: read what went wrong, then queue it again.",
        ),
        Status::Cancelled => (
            "Cancelled",
            "Nothing more happens; queue it again to retry.",
        ),
    };
    StatusWords { label, next_step }
}

/// A status name from the API (the event log, a served request) in words;
/// an unknown name as it is.
pub fn status_label(name: &str) -> String {
    match name.parse::<Status>() {
        Ok(status) => status_words(status).label.to_owned(),
        Err(_) => name.to_owned(),
    }
}

/// What the queue form labels each field of the API's order.
const FIELD_LABELS: [(&str, &str); 6] = [
    ("source", "Source CVM"),
    ("node", "Node"),
    ("count", "Count"),
    ("env", "Env overrides"),
    ("note", "Note"),
    ("compose_hash", "Compose hash"),
];

/// An API error message in the page's words: fields as the form labels
/// them, "Auto" for leaving the node out, and no backticks.
pub fn page_words(message: &str) -> String {
    let mut text = message
        .replace("leave `node` out", "choose Auto as the node")
        .replace("allowed_envs", "allowed env names");
    for (field, label) in FIELD_LABELS {
        text = text.replace(&format!("`{field}`"), label);
    }
    text.replace('`', "")
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn every_status_has_plain_words_and_a_next_step() {
        let mut labels = Vec::new();
        for status in Status::ALL {
            let words = status_words(status);
            assert!(
                !words.label.contains('_') && words.label != status.as_str(),
                "{status}: {words:?}"
            );
            assert!(words.label.starts_with(char::is_uppercase), "{words:?}");
            assert!(words.next_step.ends_with('.'), "{words:?}");
            assert!(!words.next_step.contains('`'), "{words:?}");
            assert_eq!(status_label(status.as_str()), words.label);
            labels.push(words.label);
        }
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), Status::ALL.len(), "two statuses read alike");
        // The approval's next step names every stage to come.
        let waiting = status_words(Status::AwaitingApproval).next_step;
        for stage in [
            "sign in Safe{Wallet}",
            "executes",
            "confirmations",
            "commits",
        ] {
            assert!(waiting.contains(stage), "{waiting}");
        }
        assert_eq!(status_label("something_new"), "something_new");
    }

    #[test]
    fn people_are_you_a_name_or_a_short_address() {
        let alice = "0x976EA74026E726554dB657fA54763abd0C3a0aa9";
        let bob = "0x14dC79964da2C08b23698B3D3cc7Ca32193d9955";
        let names = crate::config::Names::default();
        let viewer = alice.to_lowercase();
        let people = People::new(&names, Some(viewer.as_str()));
        let you = people.person(alice);
        assert!(you.you);
        assert_eq!(you.word(), "you");
        assert_eq!(you.full, alice);
        let other = people.person(&bob.to_lowercase());
        assert_eq!(other.word(), "0x14dC…9955");
        assert_eq!(other.full, bob);
        assert_eq!(people.actor(&format!("web:{alice}")).word(), "you");
        assert_eq!(people.actor("api:ops").word(), "API token ops");
        assert_eq!(people.actor("ci:github").word(), "CI client github");
        assert_eq!(people.actor("worker").word(), "the bridge");
        let sso = People::new(&names, Some("ops@example.com"));
        assert_eq!(sso.actor("web:ops@example.com").word(), "you");
        assert_eq!(sso.actor("web:else@example.com").word(), "else@example.com");
        assert_eq!(short_hex("web-prod"), "web-prod");
    }

    #[test]
    fn times_read_relative_with_their_utc_time() {
        let now = Utc.with_ymd_and_hms(2026, 12, 7, 21, 0, 0).unwrap();
        let cases = [
            (now, "just now"),
            (now + chrono::Duration::seconds(30), "just now"),
            (now - chrono::Duration::seconds(42), "42 s ago"),
            (now - chrono::Duration::minutes(3), "3 min ago"),
            (now - chrono::Duration::hours(5), "5 h ago"),
            (now - chrono::Duration::hours(30), "yesterday"),
            (now - chrono::Duration::days(9), "9 days ago"),
        ];
        for (at, want) in cases {
            assert_eq!(Moment::new(at, now).ago, want);
        }
        let moment = Moment::new(now - chrono::Duration::minutes(3), now);
        assert_eq!(moment.absolute, "2026-12-07 20:57:00 UTC");
        assert_eq!(moment.iso, "2026-12-07T20:57:00Z");
    }

    #[test]
    fn api_errors_read_in_the_forms_words() {
        assert_eq!(
            page_words("`source`: must not be empty"),
            "Source CVM: must not be empty"
        );
        assert_eq!(
            page_words("Choose another node, or leave `node` out to let Phala schedule."),
            "Choose another node, or choose Auto as the node to let Phala schedule."
        );
        assert_eq!(
            page_words("env variable `DB_URL` is not in the app's allowed_envs (A)"),
            "env variable DB_URL is not in the app's allowed env names (A)"
        );
    }
}
