//! `approval-bridge delegate register`: lets a proposer key that is not a
//! Safe owner propose, by having an owner register it as a delegate with the
//! Safe Transaction Service (safe.md §3.1).
//!
//! Two runs, because the owner's key never comes near the bridge:
//!
//! 1. without `--signature` it prints the EIP-712 `Delegate` message for the
//!    proposer's address and this hour (stdout: the typed data JSON, so that
//!    `> delegate.json` hands it straight to a wallet; stderr: the digest and
//!    how to sign);
//! 2. with the owner's `--signature` it recovers the owner, checks on chain
//!    that it owns the Safe, and registers the delegate.

use std::time::{SystemTime, UNIX_EPOCH};

use alloy::primitives::{Address, Bytes};
use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::chain::OwnerKind;
use crate::config::{AllowedSafes, SafeSettings};
use crate::safe::SafeFlow;
use crate::safe::{
    DelegateRegistration, SafeServiceError, delegate_hash, delegate_totp, recover_signer,
};

#[derive(Debug, Subcommand)]
pub enum DelegateCommand {
    /// Print the message an owner signs to make the proposer key a delegate
    /// of a Safe; with --signature, register it with the Safe Transaction Service.
    Register(Box<RegisterArgs>),
}

/// The `serve` settings of the Safe flow supply the proposer key, the
/// Transaction Service and the RPC. The ones only `serve` uses are accepted
/// (they share the environment) but left out of the help.
#[derive(Debug, Args)]
#[command(mut_args(|arg| {
    let used = SHOWN.contains(&arg.get_id().as_str());
    arg.hide(!used)
}))]
pub struct RegisterArgs {
    /// The Safe the proposer will propose to.
    #[arg(long)]
    pub safe: Address,

    /// The chain the Safe is on.
    #[arg(long)]
    pub chain_id: u64,

    /// An owner's signature of the printed message: 65 bytes of hex (r ‖ s ‖ v).
    /// Without it, the message is printed.
    #[arg(long, value_name = "0x…")]
    pub signature: Option<String>,

    /// The delegate's label in the Transaction Service (at most 50 characters).
    #[arg(long, default_value = "approval-bridge", value_parser = parse_label)]
    pub label: String,

    #[command(flatten)]
    pub settings: SafeSettings,
}

/// The arguments `delegate register` reads, by clap id.
const SHOWN: &[&str] = &[
    "safe",
    "chain_id",
    "signature",
    "label",
    "rpc_urls",
    "eth_rpc_url",
    "proposer_key",
    "proposer_key_file",
    "safe_service_urls",
    "safe_api_key",
    "safe_rate_limit",
];

pub async fn run(command: DelegateCommand) -> anyhow::Result<()> {
    match command {
        DelegateCommand::Register(args) => register(*args, unix_now()).await,
    }
}

async fn register(args: RegisterArgs, now: u64) -> anyhow::Result<()> {
    // The allowed Safes do not matter here, and the chain of the one given is
    // checked below; without them `from_settings` checks nothing over the network.
    let flow = SafeFlow::from_settings(&SafeSettings {
        safes: AllowedSafes::default(),
        ..args.settings
    })?;
    let proposer = flow
        .proposer()
        .ok_or_else(|| {
            anyhow!(
                "missing setting APPROVAL_BRIDGE_PROPOSER_KEY (--proposer-key) or \
                 APPROVAL_BRIDGE_PROPOSER_KEY_FILE (--proposer-key-file): the delegate is that key's address"
            )
        })?
        .address();
    // Fails now, before an owner signs, when no service is known for the chain.
    let service = flow.service(args.chain_id)?;

    let Some(signature) = args.signature else {
        let totp = delegate_totp(now);
        println!(
            "{}",
            serde_json::to_string_pretty(&typed_data(proposer, totp, args.chain_id))?
        );
        eprintln!(
            "digest: {}",
            delegate_hash(proposer, totp, Some(args.chain_id))
        );
        eprintln!(
            "An owner of Safe {} signs the typed data above with any EIP-712 wallet, or saves it as \
             delegate.json and runs `cast wallet sign --data --from-file delegate.json`; then run this \
             command again with --signature <0x…>. The signature is valid this hour and the next \
             (until {}).",
            args.safe.to_checksum(None),
            valid_until(totp)
        );
        return Ok(());
    };

    let signature = parse_signature(&signature)?;
    let candidates = signers(proposer, &signature, args.chain_id, now)?;
    let safe = args.safe;
    let chain_id = args.chain_id;
    // With an RPC the owner is known before anything is sent; without one the
    // service checks ownership itself (the registration names the Safe).
    let candidates = match flow.chain(chain_id) {
        Some(chain) => {
            chain.check_chain_id().await?;
            let owners = match chain
                .owner_kind(safe)
                .await
                .with_context(|| format!("cannot read Safe {safe} on chain {chain_id}"))?
            {
                OwnerKind::Safe(info) => info.owners,
                OwnerKind::Eoa => bail!("{safe} on chain {chain_id} is not a contract"),
                OwnerKind::NotASafe { detail } => {
                    bail!("{safe} on chain {chain_id} is not a Safe: {detail}")
                }
            };
            match candidates.iter().find(|signer| owners.contains(signer)) {
                Some(owner) => vec![*owner],
                None => bail!(
                    "the signature is not by an owner of Safe {safe} on chain {chain_id} \
                     (for this hour's message it recovers to {}); have an owner sign the message \
                     printed without --signature",
                    candidates[0]
                ),
            }
        }
        None => candidates,
    };

    let mut first_refusal = None;
    for delegator in candidates {
        let registration = DelegateRegistration {
            safe: Some(safe),
            delegate: proposer,
            delegator,
            label: args.label.clone(),
            signature: signature.clone(),
        };
        match service.register_delegate(&registration).await {
            Ok(()) => {
                println!(
                    "registered {proposer} as a delegate of owner {delegator} for Safe {safe} on chain {chain_id} (label \"{}\")",
                    args.label
                );
                return Ok(());
            }
            // Perhaps signed last hour: the next candidate is that hour's signer.
            Err(err @ SafeServiceError::Rejected { .. }) => {
                first_refusal.get_or_insert(err);
            }
            Err(err) => return Err(service_error(err)),
        }
    }
    Err(service_error(
        first_refusal.expect("at least one candidate was tried"),
    ))
}

/// The EIP-712 typed data of the delegate message, in the JSON that wallets
/// (`eth_signTypedData_v4`) and `cast wallet sign --data` read.
pub fn typed_data(delegate: Address, totp: u64, chain_id: u64) -> Value {
    json!({
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
            ],
            "Delegate": [
                {"name": "delegateAddress", "type": "address"},
                {"name": "totp", "type": "uint256"},
            ],
        },
        "primaryType": "Delegate",
        "domain": {
            "name": "Safe Transaction Service",
            "version": "1.0",
            "chainId": chain_id,
        },
        "message": {
            "delegateAddress": delegate.to_checksum(None),
            "totp": totp,
        },
    })
}

/// The service accepts this hour's totp and the previous one, so a message
/// signed in hour `totp` works until the end of the next hour.
fn valid_until(totp: u64) -> String {
    i64::try_from((totp + 2) * 3600)
        .ok()
        .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0))
        .map(|at| at.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|| "the end of the next hour".to_owned())
}

/// Who signed: the signer of this hour's message, then of the previous
/// hour's. Recovery always yields an address, so only an owner check tells
/// which message was signed.
fn signers(
    delegate: Address,
    signature: &[u8],
    chain_id: u64,
    now: u64,
) -> anyhow::Result<Vec<Address>> {
    let totp = delegate_totp(now);
    let mut out = Vec::new();
    for totp in [totp, totp.saturating_sub(1)] {
        let (signer, _) = recover_signer(delegate_hash(delegate, totp, Some(chain_id)), signature)
            .map_err(|err| anyhow!("invalid --signature: {err}"))?;
        if !out.contains(&signer) {
            out.push(signer);
        }
    }
    Ok(out)
}

/// 65 bytes of hex, `0x` optional. Some wallets write v as 0/1; the service
/// reads those as contract or approved-hash signatures, so they become 27/28.
fn parse_signature(text: &str) -> anyhow::Result<Bytes> {
    let digits = text.trim();
    let digits = digits.strip_prefix("0x").unwrap_or(digits);
    let mut bytes =
        hex::decode(digits).map_err(|_| anyhow!("invalid --signature: it is not hex"))?;
    if bytes.len() != 65 {
        bail!(
            "invalid --signature: a signature is 65 bytes (r ‖ s ‖ v, 130 hex digits), got {}",
            bytes.len()
        );
    }
    if bytes[64] < 2 {
        bytes[64] += 27;
    }
    Ok(bytes.into())
}

fn parse_label(value: &str) -> Result<String, String> {
    let label = value.trim();
    if label.is_empty() {
        return Err("must not be empty".into());
    }
    if label.chars().count() > 50 {
        return Err("must be at most 50 characters".into());
    }
    Ok(label.to_owned())
}

/// One line, whatever the service answered (an HTML error page has many).
fn service_error(err: SafeServiceError) -> anyhow::Error {
    let text = match &err {
        SafeServiceError::Rejected { body } => {
            format!("the Safe Transaction Service refused the registration: {body}")
        }
        other => format!("{other}; {}", other.suggestion()),
    };
    anyhow!(text.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use crate::safe::{sign_safe_tx_hash, type_hash};
    use alloy::primitives::{address, b256};
    use alloy::signers::local::PrivateKeySigner;
    use clap::{CommandFactory, Parser};

    /// `Name(type name,…)` from the JSON field list, as EIP-712 encodes it.
    fn encode_type(data: &Value, name: &str) -> String {
        let fields: Vec<String> = data["types"][name]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                format!(
                    "{} {}",
                    f["type"].as_str().unwrap(),
                    f["name"].as_str().unwrap()
                )
            })
            .collect();
        format!("{name}({})", fields.join(","))
    }

    #[test]
    fn typed_data_has_the_types_the_service_hashes() {
        let delegate = address!("70997970C51812dc3A010C7d01b50e0d17dc79C8");
        let data = typed_data(delegate, 472_222, 11155111);
        assert_eq!(
            type_hash(&encode_type(&data, "Delegate")),
            b256!("6c9e874b4b1b1537b11ab113648a187cf141593fa647a5a8ffa9abff4429cfba")
        );
        assert_eq!(
            type_hash(&encode_type(&data, "EIP712Domain")),
            b256!("c2f8787176b8ac6bf7215b4adcc1e069bf4ab82d9ab1df05a57a91d425935b6e")
        );
        assert_eq!(data["primaryType"], "Delegate");
        assert_eq!(data["domain"]["chainId"], 11155111);
        assert_eq!(
            data["message"]["delegateAddress"],
            "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
        );
        assert_eq!(data["message"]["totp"], 472_222);
    }

    #[test]
    fn a_signature_of_last_hours_message_recovers_as_the_second_candidate() {
        let owner = PrivateKeySigner::random();
        let delegate = address!("70997970C51812dc3A010C7d01b50e0d17dc79C8");
        let signed_at = 1_700_000_000;
        let digest = delegate_hash(delegate, delegate_totp(signed_at), Some(1));
        let signature = sign_safe_tx_hash(&owner, digest).unwrap();

        let now = signers(delegate, &signature, 1, signed_at).unwrap();
        assert_eq!(now[0], owner.address());
        let next_hour = signers(delegate, &signature, 1, signed_at + 3600).unwrap();
        assert_ne!(next_hour[0], owner.address());
        assert_eq!(next_hour[1], owner.address());
    }

    #[test]
    fn signatures_parse_with_or_without_0x_and_v_0_or_1_becomes_27_or_28() {
        let mut raw = [7u8; 65];
        raw[64] = 1;
        let parsed = parse_signature(&format!("0x{}", hex::encode(raw))).unwrap();
        assert_eq!(parsed[64], 28);
        raw[64] = 27;
        assert_eq!(parse_signature(&hex::encode(raw)).unwrap()[64], 27);

        for (bad, says) in [("0x1234", "got 2"), ("0xnothex", "not hex"), ("", "got 0")] {
            let err = parse_signature(bad).unwrap_err().to_string();
            assert!(err.starts_with("invalid --signature: "), "{err}");
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn labels_are_short_and_not_empty() {
        assert_eq!(parse_label(" bridge ").unwrap(), "bridge");
        assert!(parse_label(" ").is_err());
        assert!(parse_label(&"x".repeat(51)).is_err());
        assert!(parse_label(&"é".repeat(50)).is_ok());
    }

    #[test]
    fn register_takes_the_safe_settings_of_serve() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "approval-bridge",
            "delegate",
            "register",
            "--safe",
            "0x1f9090aaE28b8a3dCeaDf281B0F12828e676c326",
            "--chain-id",
            "11155111",
            "--safe-service-urls",
            "11155111=http://127.0.0.1:9",
        ])
        .unwrap();
        let Command::Delegate(DelegateCommand::Register(args)) = cli.command else {
            panic!("not delegate register");
        };
        assert_eq!(args.chain_id, 11155111);
        assert_eq!(args.label, "approval-bridge");
        assert!(args.signature.is_none());
        assert!(args.settings.safe_service_urls.get(11155111).is_some());

        let help = Cli::command()
            .find_subcommand_mut("delegate")
            .unwrap()
            .find_subcommand_mut("register")
            .unwrap()
            .render_long_help()
            .to_string();
        for shown in ["--signature", "--proposer-key-file", "--safe-api-key"] {
            assert!(help.contains(shown), "{shown} in {help}");
        }
        for hidden in ["--safes", "--batch-window-secs"] {
            assert!(!help.contains(hidden), "{hidden} in {help}");
        }
    }

    #[test]
    fn service_errors_are_one_line() {
        let err = service_error(SafeServiceError::Http {
            status: 404,
            body: "<html>\n  <body>Not Found</body>\n</html>".into(),
        });
        assert!(!err.to_string().contains('\n'), "{err}");
        let err = service_error(SafeServiceError::Rejected {
            body: r#"{"nonFieldErrors":["Signing owner is not an owner of the Safe"]}"#.into(),
        });
        assert!(
            err.to_string().ends_with(
                r#"registration: {"nonFieldErrors":["Signing owner is not an owner of the Safe"]}"#
            ),
            "{err}"
        );
    }
}
