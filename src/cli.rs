//! The `approval-bridge` command line: one binary, several subcommands.

pub mod delegate;
pub mod doctor;
pub mod sessions;

use clap::{CommandFactory, Parser, Subcommand};

use crate::config::{self, DatabaseSettings, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "approval-bridge",
    version,
    about = "Safe multisig approvals for Phala Cloud replicas"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server and the background workers in one process.
    Serve(Box<Settings>),
    /// Apply the database migrations and exit.
    Migrate(DatabaseSettings),
    /// Check the settings of `serve` against the live services (database,
    /// Phala Cloud, RPCs, Safes, Safe Transaction Service) and print a table;
    /// exits 1 if any check fails.
    Doctor(Box<Settings>),
    /// Register the proposer key as a delegate of a Safe owner.
    #[command(subcommand)]
    Delegate(delegate::DelegateCommand),
    /// End the team page's sessions: of one person, or of everyone.
    #[command(subcommand)]
    Sessions(sessions::SessionsCommand),
    /// Run the whole flow on this machine: anvil with a Safe, the Phala Cloud
    /// and Safe Transaction Service simulators, and the bridge.
    #[cfg(feature = "sandbox")]
    Sandbox(SandboxArgs),
    /// Measure the performance figures against the sandbox's world, with this
    /// binary's `serve`; print a table and write JSON.
    #[cfg(feature = "sandbox")]
    Bench(crate::bench::BenchArgs),
}

#[cfg(feature = "sandbox")]
#[derive(Debug, clap::Args)]
pub struct SandboxArgs {
    /// The sandbox's port: the web page, the sandbox controls, and the
    /// bridge's API and webhook (forwarded to the bridge).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Seconds between blocks on the local chain.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub block_time: u64,
    /// The API token to accept (as `Authorization: Bearer <token>`).
    #[arg(long, default_value = "sandbox-token")]
    pub api_token: String,
    /// The CI webhook secret.
    #[arg(long, default_value = "sandbox-secret")]
    pub webhook_secret: String,
    /// Postgres URL of the sandbox's own database, dropped and re-created at
    /// each start: its name must end in `_sandbox`. `DATABASE_URL` is never
    /// read. [default: the local approval_bridge_sandbox; with --world-only,
    /// none]
    #[arg(
        long,
        env = "APPROVAL_BRIDGE_SANDBOX_DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// Seconds requests collect before their Safe transaction is proposed.
    #[arg(long, default_value_t = 10)]
    pub batch_window_secs: u64,
    /// Blocks on top of a Safe execution before the bridge acts on it.
    #[arg(long, default_value_t = 2)]
    pub confirmations: u64,
    /// Start anvil, the Safe and the simulators without the bridge, and print
    /// the environment of `approval-bridge serve` against them on stdout.
    #[arg(long)]
    pub world_only: bool,
    /// Print the environment of `serve` on stdout (the banner then goes to
    /// stderr): `export NAME='value'` lines, or one JSON object on one line.
    /// [default with --world-only: shell]
    #[arg(long, value_enum)]
    pub print_env: Option<crate::sandbox::EnvFormat>,
    /// The bridge's own port (with --world-only, the one `serve` is told to
    /// use). [default: a free port]
    #[arg(long)]
    pub bridge_port: Option<u16>,
    /// Nodes with free CVM slots, `prod-1` to `prod-N`, besides the full `prod-full`.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..=200))]
    pub nodes: u32,
    /// Free CVM slots on each of those nodes.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub slots: u32,
}

impl Cli {
    /// Parses the command line and environment. A bad or missing setting exits
    /// with one line that names its environment variable and flag.
    pub fn parse_or_exit() -> Cli {
        Cli::try_parse().unwrap_or_else(|err| match setting_error_line(&err) {
            Some(line) => {
                eprintln!("approval-bridge: {line}");
                std::process::exit(2);
            }
            None => err.exit(),
        })
    }
}

/// [`config::setting_error_line`] against the whole command line.
fn setting_error_line(err: &clap::Error) -> Option<String> {
    config::setting_error_line(err, &Cli::command())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_line(args: &[&str]) -> String {
        let err = Cli::try_parse_from(args).expect_err("should not parse");
        setting_error_line(&err).unwrap_or_else(|| panic!("no setting line for {err}"))
    }

    #[test]
    fn missing_setting_names_the_variable() {
        // Run without the environment of the machine interfering.
        let line = error_line(&["approval-bridge", "migrate"]);
        if std::env::var_os("DATABASE_URL").is_none() {
            assert_eq!(line, "missing setting DATABASE_URL (--database-url)");
        }
    }

    #[test]
    fn invalid_setting_names_the_variable_and_hides_the_value() {
        let line = error_line(&[
            "approval-bridge",
            "serve",
            "--database-url",
            "postgres://localhost/x",
            "--phala-api-key",
            "k",
            "--api-tokens",
            "ci=hunter2",
        ]);
        assert!(
            line.starts_with("invalid setting APPROVAL_BRIDGE_API_TOKENS (--api-tokens): "),
            "{line}"
        );
        assert!(!line.contains("hunter2"), "{line}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn the_sandbox_subcommand_exists_only_with_the_sandbox_feature() {
        let command = Cli::command();
        let names: Vec<&str> = command.get_subcommands().map(|c| c.get_name()).collect();
        assert_eq!(
            names.contains(&"sandbox"),
            cfg!(feature = "sandbox"),
            "{names:?}"
        );
        let help = command.clone().render_long_help().to_string();
        assert_eq!(
            help.contains("sandbox"),
            cfg!(feature = "sandbox"),
            "{help}"
        );
    }

    #[cfg(feature = "sandbox")]
    #[test]
    fn the_sandbox_reads_its_own_database_setting_never_database_url() {
        let command = Cli::command();
        let sandbox = command.find_subcommand("sandbox").unwrap();
        let envs: Vec<String> = sandbox
            .get_arguments()
            .filter_map(|arg| arg.get_env())
            .map(|env| env.to_string_lossy().into_owned())
            .collect();
        assert_eq!(envs, ["APPROVAL_BRIDGE_SANDBOX_DATABASE_URL"]);
    }

    #[test]
    fn invalid_number_names_the_variable() {
        let line = error_line(&[
            "approval-bridge",
            "serve",
            "--database-url",
            "postgres://localhost/x",
            "--phala-api-key",
            "k",
            "--workers",
            "many",
        ]);
        assert!(
            line.starts_with("invalid setting APPROVAL_BRIDGE_WORKERS (--workers): "),
            "{line}"
        );
    }
}
