//! The sandbox's own database. The sandbox drops and re-creates it at every
//! start, so it comes from its own setting (`APPROVAL_BRIDGE_SANDBOX_DATABASE_URL`
//! or `--database-url`), never from `serve`'s `DATABASE_URL`, and its name must
//! end in `_sandbox`: a production database cannot be named by mistake.

use anyhow::{Context, bail};
use reqwest::Url;
use sqlx::{Connection, PgConnection};

/// The local Postgres of this machine kind, with the sandbox's own database.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/approval_bridge_sandbox";
/// The ending every sandbox database name must have.
pub const SUFFIX: &str = "_sandbox";
/// Where the sandbox reads its database URL from (besides `--database-url`).
pub const SETTING: &str = "APPROVAL_BRIDGE_SANDBOX_DATABASE_URL";

/// A checked sandbox database: its URL, the server's maintenance database,
/// and its name.
#[derive(Clone)]
pub struct SandboxDatabase {
    url: String,
    maintenance: String,
    name: String,
}

impl std::fmt::Debug for SandboxDatabase {
    // The URL may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxDatabase")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl SandboxDatabase {
    /// Checks `url` without connecting: a Postgres URL whose database name is
    /// letters, digits and `_`, ending in `_sandbox`. Errors are one line and
    /// never echo the URL (it may carry a password).
    pub fn parse(url: &str) -> anyhow::Result<SandboxDatabase> {
        let parsed = Url::parse(url)
            .ok()
            .filter(|u| matches!(u.scheme(), "postgres" | "postgresql") && u.has_host())
            .with_context(|| {
                format!("{SETTING} (--database-url) is not a postgres://host/name URL")
            })?;
        let name = parsed.path().trim_start_matches('/').to_owned();
        if name.is_empty() {
            bail!("{SETTING} (--database-url) names no database");
        }
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("the sandbox database name `{name}` must be letters, digits and `_`");
        }
        if !name.ends_with(SUFFIX) || name.len() == SUFFIX.len() {
            bail!(
                "refusing database `{name}`: the sandbox empties its database at every start, \
                 so the name must end in `{SUFFIX}` (set {SETTING} or --database-url)"
            );
        }
        let mut maintenance = parsed.clone();
        maintenance.set_path("/postgres");
        Ok(SandboxDatabase {
            url: url.to_owned(),
            maintenance: maintenance.into(),
            name,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Empties the database: drop it and create it again.
    pub async fn reset(&self) -> anyhow::Result<()> {
        let mut conn = PgConnection::connect(&self.maintenance)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "cannot reach Postgres at {}: start it (pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start) or set {SETTING}",
                    host_of(&self.maintenance)
                )
            })?;
        let name = &self.name;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await?;
        Ok(())
    }
}

/// `host:port` of a URL, never its user or password.
fn host_of(url: &str) -> String {
    match Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            _ => "the configured server".to_owned(),
        },
        Err(_) => "the configured server".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_ending_in_sandbox_are_accepted() {
        let db =
            SandboxDatabase::parse("postgres://postgres@127.0.0.1:5432/approval_bridge_sandbox")
                .unwrap();
        assert_eq!(db.name(), "approval_bridge_sandbox");
        assert_eq!(
            db.maintenance,
            "postgres://postgres@127.0.0.1:5432/postgres"
        );

        for (url, expected) in [
            (
                "postgres://u:hunter2@db/approval_bridge",
                "must end in `_sandbox`",
            ),
            ("postgres://u:hunter2@db/_sandbox", "must end in `_sandbox`"),
            (
                "postgres://u:hunter2@db/sandbox_prod",
                "must end in `_sandbox`",
            ),
            ("postgres://u:hunter2@db/", "names no database"),
            ("postgres://u:hunter2@db/x;drop_sandbox", "letters, digits"),
            ("mysql://u:hunter2@db/x_sandbox", "is not a postgres"),
        ] {
            let err = SandboxDatabase::parse(url).unwrap_err().to_string();
            assert!(err.contains(expected), "{url}: {err}");
            assert!(!err.contains("hunter2"), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn query_parameters_are_not_part_of_the_name() {
        let db = SandboxDatabase::parse("postgres://db:5433/x_sandbox?sslmode=disable").unwrap();
        assert_eq!(db.name(), "x_sandbox");
        assert_eq!(host_of(&db.maintenance), "db:5433");
    }
}
