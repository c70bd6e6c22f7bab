//! `approval-bridge doctor`: checks the settings of `serve` against the live
//! services and prints one row per check. Any failure makes the exit code 1.
//!
//! It reads what `serve` reads and writes nothing anywhere.

use std::fmt::Write as _;
use std::future::Future;
use std::time::Duration;

use alloy::primitives::Address;

use crate::chain::{OwnerKind, SafeInfo};
use crate::config::Settings;
use crate::phala::PhalaClient;
use crate::safe::SafeFlow;
use crate::store::{self, Store};
use crate::telemetry::redact;

/// One check may take this long: an RPC call retries transient failures
/// for about 32 s, which is longer than anybody waits at a terminal.
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub check: String,
    pub target: String,
    pub ok: bool,
    pub detail: String,
}

impl Row {
    fn new(check: &str, target: impl Into<String>, result: Result<String, String>) -> Row {
        let (ok, detail) = match result {
            Ok(detail) => (true, detail),
            Err(detail) => (false, detail),
        };
        Row {
            check: check.to_owned(),
            target: target.into(),
            ok,
            detail: redact(&detail).into_owned(),
        }
    }
}

/// Runs every check, prints the table on stdout, and says whether all passed.
pub async fn run(settings: Settings) -> anyhow::Result<bool> {
    crate::telemetry::register_settings(&settings);
    let rows = check(&settings).await;
    print!("{}", table(&rows));
    let failed = rows.iter().filter(|r| !r.ok).count();
    if failed == 0 {
        println!("\nall {} checks passed", rows.len());
    } else {
        println!("\n{failed} of {} checks failed", rows.len());
    }
    Ok(failed == 0)
}

/// Every check, in the order of the table.
pub async fn check(settings: &Settings) -> Vec<Row> {
    let mut rows = Vec::new();
    rows.extend(check_database(settings).await);
    rows.push(check_phala(settings).await);
    rows.extend(check_scopes(settings));
    rows.push(check_server_secret(settings));
    let flow = match SafeFlow::from_settings(&settings.safe) {
        Ok(flow) => flow,
        Err(err) => {
            rows.push(Row::new("proposer", "key", Err(format!("{err:#}"))));
            return rows;
        }
    };
    for chain_id in settings.safe.configured_chain_ids() {
        rows.push(check_rpc(&flow, chain_id).await);
    }
    for &(chain_id, safe) in &settings.safe.safes.0 {
        rows.extend(check_safe(&flow, chain_id, safe).await);
    }
    rows.extend(check_notification_targets(settings).await);
    rows
}

async fn check_database(settings: &Settings) -> Vec<Row> {
    let target = "DATABASE_URL";
    let pool = match bounded(async {
        store::connect(&settings.database)
            .await
            .map_err(|err| format!("{err:#}"))
    })
    .await
    {
        Ok(pool) => pool,
        Err(err) => return vec![Row::new("database", target, Err(err))],
    };
    let store = Store::new(pool);
    let migrations = match store.pending_migrations().await {
        Ok(pending) if pending.is_empty() => Ok("all applied".to_owned()),
        Ok(pending) => Err(format!(
            "{} not applied ({pending:?}): `serve` or `approval-bridge migrate` applies them",
            pending.len()
        )),
        // A new database has no migration table yet.
        Err(_) => Err("none applied: `serve` or `approval-bridge migrate` applies them".to_owned()),
    };
    store.pool().close().await;
    vec![
        Row::new("database", target, Ok("answers".to_owned())),
        Row::new("migrations", target, migrations),
    ]
}

async fn check_phala(settings: &Settings) -> Row {
    let target = "APPROVAL_BRIDGE_PHALA_API_KEY";
    let result = bounded(async {
        let phala = PhalaClient::new(&settings.phala).map_err(|err| format!("{err:#}"))?;
        match phala.available_nodes().await {
            Ok(nodes) => Ok(format!(
                "accepted by {} ({} nodes available)",
                host_of(&settings.phala.phala_api_url),
                nodes.nodes.len()
            )),
            Err(err) if matches!(err.status(), Some(401 | 403)) => Err(format!(
                "Phala Cloud refused the API key (HTTP {}): set a valid key in APPROVAL_BRIDGE_PHALA_API_KEY",
                err.status().unwrap_or_default()
            )),
            Err(err) => Err(format!(
                "{}: {err}",
                host_of(&settings.phala.phala_api_url)
            )),
        }
    })
    .await;
    Row::new("phala", target, result)
}

async fn check_rpc(flow: &SafeFlow, chain_id: u64) -> Row {
    let target = format!("chain {chain_id}");
    let Some(chain) = flow.chain(chain_id) else {
        return Row::new(
            "rpc",
            target,
            Err("no RPC URL: set APPROVAL_BRIDGE_RPC_URLS or ETH_RPC_URL".into()),
        );
    };
    let result = bounded(async {
        chain
            .check_chain_id()
            .await
            .map_err(|err| format!("{err:#}"))?;
        let head = chain.head().await.map_err(|err| format!("{err:#}"))?;
        Ok(format!("answers for chain {chain_id}, head block {head}"))
    })
    .await;
    Row::new("rpc", target, result)
}

/// The Safe itself, the proposer's right to propose to it, and the
/// Transaction Service (asked, with the API key, for the proposer's
/// delegations).
async fn check_safe(flow: &SafeFlow, chain_id: u64, safe: Address) -> Vec<Row> {
    let target = format!("{chain_id}:{}", safe.to_checksum(None));
    let Some(chain) = flow.chain(chain_id) else {
        return vec![Row::new(
            "safe",
            target,
            Err(format!("no RPC URL for chain {chain_id}")),
        )];
    };
    let info = bounded(async {
        match chain
            .owner_kind(safe)
            .await
            .map_err(|err| format!("{err:#}"))?
        {
            OwnerKind::Safe(info) => Ok(info),
            OwnerKind::Eoa => Err("not a contract on this chain".to_owned()),
            OwnerKind::NotASafe { detail } => Err(format!("not a Safe: {detail}")),
        }
    })
    .await;
    let mut rows = vec![Row::new(
        "safe",
        &target,
        info.as_ref().map(describe_safe).map_err(Clone::clone),
    )];
    let Some(proposer) = flow.proposer().map(|p| p.address()) else {
        return rows;
    };
    let service = bounded(async {
        let service = flow.service(chain_id).map_err(|err| format!("{err:#}"))?;
        service
            .delegates(proposer)
            .await
            .map_err(|err| format!("{err:#}"))
    })
    .await;
    rows.push(Row::new(
        "safe service",
        format!("chain {chain_id}"),
        match &service {
            Ok(delegations) => Ok(format!(
                "answers ({} delegations of the proposer)",
                delegations.len()
            )),
            Err(err) => Err(err.clone()),
        },
    ));
    let proposer_text = proposer.to_checksum(None);
    let may_propose = match (&info, &service) {
        (Ok(info), _) if info.owners.contains(&proposer) => {
            Ok(format!("{proposer_text} is an owner"))
        }
        (Ok(info), Ok(delegations)) => match delegations
            .iter()
            .find(|d| info.owners.contains(&d.delegator) && d.safe.is_none_or(|s| s == safe))
        {
            Some(d) => Ok(format!(
                "{proposer_text} is a delegate of owner {}",
                d.delegator.to_checksum(None)
            )),
            None => Err(format!(
                "{proposer_text} is neither an owner nor a delegate of an owner: \
                 register it with `approval-bridge delegate register --safe {}`",
                safe.to_checksum(None)
            )),
        },
        _ => Err("cannot tell: the Safe or the Transaction Service did not answer".to_owned()),
    };
    rows.push(Row::new("proposer", target, may_propose));
    rows
}

fn describe_safe(info: &SafeInfo) -> String {
    let owners: Vec<String> = info.owners.iter().map(|o| o.to_checksum(None)).collect();
    format!(
        "Safe {}, {} of {} owners ({}), nonce {}",
        info.version,
        info.threshold,
        info.owners.len(),
        owners.join(", "),
        info.nonce
    )
}

/// Every API token and CI client needs a scope entry: without one it may do
/// nothing (this was "anything" before scopes covered reading).
fn check_scopes(settings: &Settings) -> Vec<Row> {
    let target = "APPROVAL_BRIDGE_SCOPES";
    let callers = settings
        .api_tokens
        .0
        .iter()
        .map(|(name, _)| format!("api:{name}"))
        .chain(
            settings
                .webhook_secrets
                .0
                .iter()
                .map(|(name, _)| format!("ci:{name}")),
        );
    let unscoped: Vec<Row> = callers
        .filter(|caller| !settings.trust.scopes.0.iter().any(|(c, _)| c == caller))
        .map(|caller| {
            Row::new(
                "scope",
                target,
                Err(format!(
                    "{caller} has no scope, so every call it makes is refused: add \
                     `{caller}=<sources>`, or `{caller}=*` for any source"
                )),
            )
        })
        .collect();
    if unscoped.is_empty() {
        vec![Row::new(
            "scope",
            target,
            Ok("every API token and CI client has a scope".to_owned()),
        )]
    } else {
        unscoped
    }
}

/// The server's secret keys what the database keeps of idempotent orders.
fn check_server_secret(settings: &Settings) -> Row {
    let detail = if settings.server.server_secret.is_some() {
        "set: it keys the hashes of idempotent orders".to_owned()
    } else {
        "not set: the hashes of idempotent orders are keyed with a key derived from \
         APPROVAL_BRIDGE_PHALA_API_KEY; give the bridge a secret of its own \
         (`openssl rand -hex 32`) so that rotating the Phala key keeps them"
            .to_owned()
    };
    Row::new("server secret", "APPROVAL_BRIDGE_SERVER_SECRET", Ok(detail))
}

/// HOOK for the notification targets (webhooks, chat) that tell the Safe's
/// owners about a new proposal: they are not part of the settings yet. Once
/// they are, this sends each a test request and gives one row per target.
/// Each notification target answers HTTP at all: any status counts, since a
/// webhook may refuse a request that carries no message. Named, never shown:
/// the URL is a secret.
async fn check_notification_targets(settings: &Settings) -> Vec<Row> {
    use secrecy::ExposeSecret;
    let http = reqwest::Client::new();
    let mut rows = Vec::new();
    for (name, url) in &settings.notify.notify_urls.0 {
        let answer = bounded(async {
            let response = http
                .head(url.expose_secret())
                .send()
                .await
                .map_err(|err| redact(&err.without_url().to_string()).into_owned())?;
            Ok(format!("answers (HTTP {})", response.status().as_u16()))
        })
        .await;
        rows.push(Row::new("notification target", name, answer));
    }
    rows
}

async fn bounded<T>(check: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(CHECK_TIMEOUT, check)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} s", CHECK_TIMEOUT.as_secs())))
}

fn host_of(url: &reqwest::Url) -> String {
    match url.port() {
        Some(port) => format!("{}:{port}", url.host_str().unwrap_or("?")),
        None => url.host_str().unwrap_or("?").to_owned(),
    }
}

/// The rows as an aligned text table.
pub fn table(rows: &[Row]) -> String {
    let header = Row {
        check: "CHECK".into(),
        target: "TARGET".into(),
        ok: true,
        detail: "DETAIL".into(),
    };
    let width = |f: fn(&Row) -> usize| rows.iter().chain([&header]).map(f).max().unwrap_or(0);
    let (check_w, target_w) = (
        width(|r| r.check.chars().count()),
        width(|r| r.target.chars().count()),
    );
    let mut out = String::new();
    let mut line = |result: &str, r: &Row| {
        let _ = writeln!(
            out,
            "{result:<6} {:<check_w$}  {:<target_w$}  {}",
            r.check, r.target, r.detail
        );
    };
    line("RESULT", &header);
    for row in rows {
        line(if row.ok { "ok" } else { "FAIL" }, row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_aligns_columns_and_marks_failures() {
        let rows = vec![
            Row::new(
                "phala",
                "APPROVAL_BRIDGE_PHALA_API_KEY",
                Ok("accepted".into()),
            ),
            Row::new("rpc", "chain 1", Err("answers for chain 5".into())),
        ];
        let text = table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("RESULT CHECK"), "{text}");
        assert!(lines[1].starts_with("ok     phala"), "{text}");
        assert!(lines[2].starts_with("FAIL   rpc  "), "{text}");
        let detail_at = lines[1].find("accepted").unwrap();
        assert_eq!(
            lines[2].find("answers for chain 5").unwrap(),
            detail_at,
            "{text}"
        );
    }
}
