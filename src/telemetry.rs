//! Logging set-up (human-readable text by default, JSON when configured) and
//! the redaction of credentials from everything the bridge writes.
//!
//! RPC, Safe service and Phala URLs may carry API keys (in the path, the
//! query or the user info), and client errors quote the URL they failed on.
//! Start-up registers the secret parts of every configured URL and secret;
//! [`redact`] replaces them in stored errors and API answers, and the log
//! writer in every log line.

use std::borrow::Cow;
use std::io::{self, IsTerminal, Write};
use std::sync::RwLock;

use reqwest::Url;
use secrecy::ExposeSecret;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::{LogFormat, SafeSettings, Settings};

/// What replaces a secret.
pub const REDACTED: &str = "[redacted]";
/// Shorter fragments are not registered: replacing them everywhere would
/// garble ordinary text, and every secret the bridge accepts is longer.
const MIN_FRAGMENT: usize = 8;

/// `(needle, replacement)`, longest needle first.
static REDACTIONS: RwLock<Vec<(String, String)>> = RwLock::new(Vec::new());

/// Installs the global subscriber, writing to stdout. `RUST_LOG` sets the
/// filter (default `info`).
pub fn init(format: LogFormat) {
    install(format, std::io::stdout, std::io::stdout().is_terminal());
}

/// The same, writing to stderr: for commands whose stdout is read by programs.
pub fn init_stderr(format: LogFormat) {
    install(format, std::io::stderr, std::io::stderr().is_terminal());
}

/// Colours only when a person reads the output: a file, a pipe or a log
/// collector gets plain text.
fn install<W>(format: LogFormat, writer: W, terminal: bool)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
    for<'a> <W as MakeWriter<'a>>::Writer: Write,
{
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal && format == LogFormat::Text)
        .with_writer(Redacting(writer));
    // `try_init` so that tests, which may call this more than once, do not panic.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Registers every URL and secret of the settings: the Phala, RPC and Safe
/// service URLs, the API keys, the proposer key, tokens, webhook secrets and
/// the database password.
pub fn register_settings(settings: &Settings) {
    register_url(&settings.phala.phala_api_url);
    register_secret(settings.phala.phala_api_key.expose_secret());
    register_safe_settings(&settings.safe);
    let named = settings
        .api_tokens
        .0
        .iter()
        .chain(&settings.webhook_secrets.0);
    for (_, secret) in named {
        register_secret(secret.expose_secret());
    }
    // Notification targets: a Slack webhook URL is its own credential.
    for (_, url) in &settings.notify.notify_urls.0 {
        register_secret(url.expose_secret());
    }
    let others = [
        &settings.notify.notify_secret,
        &settings.web.proxy_secret,
        &settings.web.session_secret,
        &settings.server.ops_token,
        &settings.server.server_secret,
    ];
    for secret in others.into_iter().flatten() {
        register_secret(secret.expose_secret());
    }
    if let Ok(url) = Url::parse(settings.database.database_url.expose_secret())
        && let Some(password) = url.password()
    {
        register_secret(password);
    }
}

/// The chain and Safe settings alone (the `delegate` command has only these).
pub fn register_safe_settings(safe: &SafeSettings) {
    let urls = safe
        .rpc_urls
        .0
        .iter()
        .chain(safe.ws_urls.0.iter())
        .chain(safe.safe_service_urls.0.iter());
    for (_, url) in urls {
        register_url(url);
    }
    if let Some(url) = &safe.eth_rpc_url {
        register_url(url);
    }
    for key in [&safe.safe_api_key, &safe.proposer_key]
        .into_iter()
        .flatten()
    {
        register_key(key.expose_secret());
    }
    if let Some(path) = &safe.proposer_key_file
        && let Ok(key) = std::fs::read_to_string(path)
    {
        register_key(&key);
    }
}

/// A hex key, with and without its `0x`.
fn register_key(key: &str) {
    let key = key.trim();
    register_secret(key);
    register_secret(key.strip_prefix("0x").unwrap_or(key));
}

/// Registers a secret to be replaced wherever it appears.
pub fn register_secret(secret: &str) {
    let secret = secret.trim();
    if secret.len() >= MIN_FRAGMENT {
        add(secret.to_owned(), REDACTED.to_owned());
    }
}

/// Registers the parts of `url` that may be credentials: the user info,
/// query values, long path segments, and the URL as a whole (shown as
/// `scheme://host/[redacted]`).
pub fn register_url(url: &Url) {
    let mut fragments: Vec<String> = Vec::new();
    fragments.push(url.username().to_owned());
    fragments.extend(url.password().map(str::to_owned));
    fragments.extend(url.query_pairs().map(|(_, value)| value.into_owned()));
    fragments.extend(url.query().map(str::to_owned));
    if let Some(segments) = url.path_segments() {
        fragments.extend(segments.map(str::to_owned));
    }
    let secret_parts: Vec<String> = fragments
        .into_iter()
        .filter(|f| f.len() >= MIN_FRAGMENT)
        .collect();
    if secret_parts.is_empty() {
        return;
    }
    let host = url.host_str().unwrap_or_default();
    let shown = match url.port() {
        Some(port) => format!("{}://{host}:{port}/{REDACTED}", url.scheme()),
        None => format!("{}://{host}/{REDACTED}", url.scheme()),
    };
    let whole = url.as_str();
    add(whole.to_owned(), shown.clone());
    if let Some(bare) = whole.strip_suffix('/') {
        add(bare.to_owned(), shown);
    }
    for part in secret_parts {
        add(part, REDACTED.to_owned());
    }
}

fn add(needle: String, replacement: String) {
    let mut list = REDACTIONS.write().unwrap_or_else(|p| p.into_inner());
    if list.iter().any(|(existing, _)| *existing == needle) {
        return;
    }
    list.push((needle, replacement));
    list.sort_by_key(|(needle, _)| std::cmp::Reverse(needle.len()));
}

/// `text` with every registered secret replaced.
pub fn redact(text: &str) -> Cow<'_, str> {
    let list = REDACTIONS.read().unwrap_or_else(|p| p.into_inner());
    let mut out = Cow::Borrowed(text);
    for (needle, replacement) in list.iter() {
        if out.contains(needle.as_str()) {
            out = Cow::Owned(out.replace(needle.as_str(), replacement));
        }
    }
    out
}

/// A log writer that redacts each line before it reaches `M`'s writer.
#[derive(Debug, Clone)]
pub struct Redacting<M>(pub M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Redacting<M> {
    type Writer = RedactingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter(self.0.make_writer())
    }
}

pub struct RedactingWriter<W>(W);

impl<W: Write> Write for RedactingWriter<W> {
    /// The formatter hands over one whole event per call, so a secret is
    /// never split across two calls.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        self.0.write_all(redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_credentials_are_replaced_and_the_host_kept() {
        let url: Url = "https://user:pa55word-x@rpc.example:8545/v2/alchemykey0123456789?apikey=querykey-abcdef&chain=base"
            .parse()
            .unwrap();
        register_url(&url);
        let message = format!("error sending request for url ({url}): connection refused");
        let clean = redact(&message);
        for secret in ["pa55word-x", "alchemykey0123456789", "querykey-abcdef"] {
            assert!(!clean.contains(secret), "{clean}");
        }
        assert!(
            clean.contains("https://rpc.example:8545/[redacted]"),
            "{clean}"
        );
        assert!(clean.contains("connection refused"));
        // A fragment on its own, as another client might quote it.
        assert_eq!(
            redact("key alchemykey0123456789 refused"),
            "key [redacted] refused"
        );
        // Short, ordinary words stay.
        assert_eq!(redact("chain base v2"), "chain base v2");
    }

    #[test]
    fn a_url_without_credentials_registers_nothing() {
        let url: Url = "http://127.0.0.1:9/".parse().unwrap();
        register_url(&url);
        assert_eq!(redact("http://127.0.0.1:9/ x"), "http://127.0.0.1:9/ x");
    }

    #[test]
    fn the_log_writer_redacts_each_line() {
        register_secret("log-writer-secret-1");
        let mut sink = Vec::new();
        let mut writer = RedactingWriter(&mut sink);
        writer
            .write_all(b"token=log-writer-secret-1 end\n")
            .unwrap();
        assert_eq!(String::from_utf8(sink).unwrap(), "token=[redacted] end\n");
    }
}
