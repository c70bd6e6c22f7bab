//! The environment that points `approval-bridge serve` at the sandbox's
//! world. `sandbox --world-only` prints it, so tests, benchmarks and people
//! can run, kill and restart the bridge while the world stays up; the full
//! sandbox builds its own bridge from the same variables, so what is printed
//! is exactly what the sandbox runs.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context;
use clap::{Args, FromArgMatches};

use crate::config::{Settings, setting_error_line};

/// The sandbox's front door: its controls and world view, with the bridge's
/// own routes forwarded to it. Printed with the environment; `serve` ignores it.
pub const SANDBOX_URL: &str = "APPROVAL_BRIDGE_SANDBOX_URL";

/// How `--print-env` prints the environment on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EnvFormat {
    /// One `export NAME='value'` line per variable, for `source` or `eval`.
    Shell,
    /// One JSON object `{"NAME": "value", …}` on one line.
    Json,
}

/// Variables in the order they were added. Values include secrets (the
/// sandbox's proposer key, its API token): print them only when asked.
#[derive(Clone, Default)]
pub struct ServeEnv {
    vars: Vec<(String, String)>,
}

impl std::fmt::Debug for ServeEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.vars.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("ServeEnv").field("names", &names).finish()
    }
}

impl ServeEnv {
    pub fn set(&mut self, name: &str, value: impl ToString) {
        let value = value.to_string();
        match self.vars.iter_mut().find(|(n, _)| n == name) {
            Some(var) => var.1 = value,
            None => self.vars.push((name.to_owned(), value)),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    pub fn render(&self, format: EnvFormat) -> String {
        match format {
            EnvFormat::Shell => self
                .vars
                .iter()
                .map(|(name, value)| format!("export {name}={}\n", shell_quote(value)))
                .collect(),
            EnvFormat::Json => {
                let map: BTreeMap<&str, &str> = self.vars().collect();
                serde_json::to_string(&map).expect("a map of strings serializes") + "\n"
            }
        }
    }

    /// The settings `serve` would read from these variables. Only these
    /// variables count: the process's own environment is not consulted.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let command = Settings::augment_args(clap::Command::new("serve"));
        let flags: HashMap<String, String> = command
            .get_arguments()
            .filter_map(|arg| {
                let env = arg.get_env()?.to_string_lossy().into_owned();
                Some((env, arg.get_long()?.to_owned()))
            })
            .collect();
        let mut args = vec!["serve".to_owned()];
        for (name, value) in self.vars() {
            if name == SANDBOX_URL {
                continue;
            }
            let flag = flags
                .get(name)
                .with_context(|| format!("{name} is not a setting of `serve`"))?;
            args.push(format!("--{flag}={value}"));
        }
        let matches = command
            .mut_args(|arg| arg.env(None::<&str>))
            .try_get_matches_from(args)
            .map_err(|err| {
                let serve = Settings::augment_args(clap::Command::new("serve"));
                let line =
                    setting_error_line(&err, &serve).unwrap_or_else(|| err.kind().to_string());
                anyhow::anyhow!("the sandbox's serve settings do not parse: {line}")
            })?;
        Ok(Settings::from_arg_matches(&matches)?)
    }
}

/// `it's` → `'it'\''s'`: safe in any POSIX shell.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    fn env() -> ServeEnv {
        let mut env = ServeEnv::default();
        env.set("APPROVAL_BRIDGE_LISTEN", "127.0.0.1:18080");
        env.set("APPROVAL_BRIDGE_PHALA_API_URL", "http://127.0.0.1:1/api/v1");
        env.set("APPROVAL_BRIDGE_PHALA_API_KEY", "phak_sandbox");
        env.set("APPROVAL_BRIDGE_API_TOKENS", "sandbox=it's-a-token");
        env.set("APPROVAL_BRIDGE_RPC_URLS", "31337=http://127.0.0.1:2");
        env.set("APPROVAL_BRIDGE_BATCH_WINDOW_SECS", 7);
        env.set(SANDBOX_URL, "http://127.0.0.1:3/");
        env.set("DATABASE_URL", "postgres://127.0.0.1/x_sandbox");
        env
    }

    #[test]
    fn the_variables_parse_as_serve_settings() {
        let settings = env().settings().unwrap();
        assert_eq!(settings.listen.to_string(), "127.0.0.1:18080");
        assert_eq!(settings.safe.batch_window_secs, 7);
        assert_eq!(settings.phala.phala_api_key.expose_secret(), "phak_sandbox");
        assert_eq!(
            settings.database.database_url.expose_secret(),
            "postgres://127.0.0.1/x_sandbox"
        );
        // What the sandbox does not set keeps serve's default.
        assert_eq!(settings.worker.max_attempts, 8);
    }

    #[test]
    fn an_unknown_variable_is_refused() {
        let mut env = env();
        env.set("APPROVAL_BRIDGE_NO_SUCH", "1");
        let err = env.settings().unwrap_err().to_string();
        assert_eq!(err, "APPROVAL_BRIDGE_NO_SUCH is not a setting of `serve`");
    }

    #[test]
    fn shell_lines_quote_and_json_is_one_line() {
        let env = env();
        let shell = env.render(EnvFormat::Shell);
        assert!(
            shell.contains("export APPROVAL_BRIDGE_API_TOKENS='sandbox=it'\\''s-a-token'\n"),
            "{shell}"
        );
        assert_eq!(shell.lines().count(), 8);
        let json = env.render(EnvFormat::Json);
        assert_eq!(json.lines().count(), 1);
        let parsed: BTreeMap<String, String> = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed["APPROVAL_BRIDGE_BATCH_WINDOW_SECS"], "7");
        assert_eq!(parsed[SANDBOX_URL], "http://127.0.0.1:3/");
    }

    #[test]
    fn debug_shows_names_only() {
        let text = format!("{:?}", env());
        assert!(text.contains("APPROVAL_BRIDGE_PHALA_API_KEY"));
        assert!(!text.contains("phak_sandbox"), "{text}");
    }
}
