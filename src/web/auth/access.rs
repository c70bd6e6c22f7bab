//! What each caller may ask for: the sources in its scope, the requests and
//! proposals it may see and cancel, and its hourly quota of replicas (see
//! `TrustSettings`). Quotas are counted in Postgres by intake, in the
//! transaction that inserts.
//!
//! An API token or CI client with no scope entry may do nothing. A person on
//! the page has a role instead (operators queue and cancel, owners read);
//! a `web:` entry narrows what they may queue and see like a token's.

use anyhow::bail;

use crate::config::{NamedSecrets, Quota, Quotas, Scopes, SourcePattern, TrustSettings};
use crate::domain::Actor;
use crate::phala::ResolvedSource;
use crate::store::Reach;
use crate::web::error::ApiError;

#[derive(Debug, Clone)]
pub struct Access {
    scopes: Scopes,
    quotas: Quotas,
    default_quota: Quota,
}

impl Access {
    /// Refuses scopes or quotas for callers that have no token or secret:
    /// a typo there would otherwise leave a caller unrestricted.
    pub fn new(
        trust: &TrustSettings,
        api_tokens: &NamedSecrets,
        webhook_secrets: &NamedSecrets,
    ) -> anyhow::Result<Access> {
        let known = |caller: &str| match caller.split_once(':') {
            Some(("api", name)) => api_tokens.0.iter().any(|(n, _)| n == name),
            Some(("ci", name)) => webhook_secrets.0.iter().any(|(n, _)| n == name),
            // People on the page: owners come from the chain and proxy users
            // from the proxy, so there is no list to check against.
            Some(("web", _)) => true,
            _ => false,
        };
        for (setting, caller) in trust
            .scopes
            .0
            .iter()
            .map(|(c, _)| ("APPROVAL_BRIDGE_SCOPES", c))
            .chain(
                trust
                    .quotas
                    .0
                    .iter()
                    .map(|(c, _)| ("APPROVAL_BRIDGE_QUOTAS", c)),
            )
        {
            if !known(caller) {
                bail!(
                    "{setting} names `{caller}`, which is no API token (api:<name>) or webhook client (ci:<name>)"
                );
            }
        }
        let unscoped: Vec<String> = api_tokens
            .0
            .iter()
            .map(|(name, _)| format!("api:{name}"))
            .chain(
                webhook_secrets
                    .0
                    .iter()
                    .map(|(name, _)| format!("ci:{name}")),
            )
            .filter(|caller| !trust.scopes.0.iter().any(|(c, _)| c == caller))
            .collect();
        if !unscoped.is_empty() {
            tracing::warn!(
                callers = %unscoped.join(", "),
                "these callers have no entry in APPROVAL_BRIDGE_SCOPES and may do nothing; \
                 give each its sources, or `*` for all"
            );
        }
        Ok(Access {
            scopes: trust.scopes.clone(),
            quotas: trust.quotas.clone(),
            default_quota: Quota {
                onchain: trust.quota_per_hour,
                cloud: trust.cloud_quota_per_hour,
            },
        })
    }

    fn entry(&self, caller: &str) -> Option<&[SourcePattern]> {
        self.scopes
            .0
            .iter()
            .find(|(c, _)| c == caller)
            .map(|(_, patterns)| patterns.as_slice())
    }

    /// A person on the page without an entry keeps their role; anyone else
    /// without one may do nothing.
    fn is_person(caller: &str) -> bool {
        caller.starts_with("web:")
    }

    /// Refuses, before anything is looked up, a caller that may queue no
    /// source at all because it has no scope entry.
    pub fn check_may_queue(&self, caller: &str) -> Result<(), ApiError> {
        if self.entry(caller).is_some() || Self::is_person(caller) {
            return Ok(());
        }
        Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "no_scope",
            format!(
                "`{caller}` has no entry in APPROVAL_BRIDGE_SCOPES, so it may queue nothing; \
                 configure its sources (`{caller}=web-prod`), or `{caller}=*` for any"
            ),
        ))
    }

    /// Whether `caller` (an actor label) may replicate `source`. A person
    /// on the page without a scope may replicate any source.
    pub fn check_scope(&self, caller: &str, source: &ResolvedSource) -> Result<(), ApiError> {
        self.check_may_queue(caller)?;
        let Some(patterns) = self.entry(caller) else {
            return Ok(());
        };
        let app = source.app_id();
        let allowed = patterns.iter().any(|pattern| match pattern {
            SourcePattern::Any => true,
            SourcePattern::Name(name) => source.cvm.name.as_deref() == Some(name.as_str()),
            SourcePattern::App(id) => app == Some(*id),
            SourcePattern::Admin => false,
        });
        if allowed {
            return Ok(());
        }
        let name = source.cvm.name.as_deref().unwrap_or(&source.vm_uuid);
        let app = app.map(|a| format!(" (app {a})")).unwrap_or_default();
        Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "source_out_of_scope",
            format!(
                "`{caller}` may not replicate `{name}`{app}; its scope allows: {}",
                patterns
                    .iter()
                    .map(|p| match p {
                        SourcePattern::Any => "*".to_owned(),
                        SourcePattern::Name(n) => n.clone(),
                        SourcePattern::App(a) => a.to_string(),
                        SourcePattern::Admin => "+admin (no source)".to_owned(),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ))
    }

    /// The requests and proposals `actor` may see and cancel: those of the
    /// sources in its scope; everything with `*` or `+admin`. A person on
    /// the page without a scope sees everything (their role decides what
    /// they may do); a token or CI client without one sees nothing.
    pub fn reach(&self, actor: &Actor) -> Reach {
        let caller = actor.label();
        let Some(patterns) = self.entry(&caller) else {
            return if Self::is_person(&caller) {
                Reach::All
            } else {
                Reach::nothing()
            };
        };
        if patterns
            .iter()
            .any(|p| matches!(p, SourcePattern::Any | SourcePattern::Admin))
        {
            return Reach::All;
        }
        let mut names = Vec::new();
        let mut app_ids = Vec::new();
        for pattern in patterns {
            match pattern {
                SourcePattern::Name(name) => names.push(name.clone()),
                SourcePattern::App(app) => app_ids.push(app.to_string()),
                SourcePattern::Any | SourcePattern::Admin => {}
            }
        }
        Reach::Sources { names, app_ids }
    }

    /// Whether `caller` holds the `+admin` grant (or `*`), which operations
    /// on everyone's behalf require.
    pub fn is_admin(&self, caller: &str) -> bool {
        self.entry(caller)
            .is_some_and(|patterns| patterns.iter().any(|p| matches!(p, SourcePattern::Admin)))
    }

    /// Replicas `caller` may queue per hour of sources on this kind of KMS.
    pub fn quota(&self, caller: &str, onchain_kms: bool) -> u32 {
        self.quotas
            .0
            .iter()
            .find(|(c, _)| c == caller)
            .map(|(_, q)| *q)
            .unwrap_or(self.default_quota)
            .for_kms(onchain_kms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_named_secrets;
    use crate::phala::CvmInfo;

    fn trust(scopes: Scopes, quotas: Quotas) -> TrustSettings {
        TrustSettings {
            scopes,
            quotas,
            ..TrustSettings::default()
        }
    }

    fn source(name: &str, app: &str) -> ResolvedSource {
        ResolvedSource {
            vm_uuid: "0b9f6c1e8a2d4c3b9e7f1a2b3c4d5e6f".into(),
            cvm: CvmInfo {
                name: Some(name.into()),
                app_id: Some(app.into()),
                ..CvmInfo::default()
            },
        }
    }

    fn tokens() -> (NamedSecrets, NamedSecrets) {
        (
            parse_named_secrets("ops=token-12345678").unwrap(),
            parse_named_secrets("github=secret-12345678").unwrap(),
        )
    }

    #[test]
    fn scopes_match_names_and_app_ids_and_refuse_callers_without_one() {
        let app = "1f".repeat(20);
        let scopes = Scopes(vec![
            (
                "ci:github".into(),
                vec![
                    SourcePattern::Name("web-prod".into()),
                    SourcePattern::App(format!("0x{}", "2e".repeat(20)).parse().unwrap()),
                ],
            ),
            ("api:ops".into(), vec![SourcePattern::Any]),
        ]);
        let (api, ci) = tokens();
        let access = Access::new(&trust(scopes, Quotas::default()), &api, &ci).unwrap();
        assert!(
            access
                .check_scope("ci:github", &source("web-prod", &app))
                .is_ok()
        );
        assert!(
            access
                .check_scope("ci:github", &source("docs", &"2e".repeat(20)))
                .is_ok()
        );
        let err = access
            .check_scope("ci:github", &source("api-prod", &app))
            .unwrap_err();
        let text = format!("{err:?}");
        assert!(
            text.contains("source_out_of_scope") && text.contains("api-prod"),
            "{text}"
        );
        assert!(
            access
                .check_scope("api:ops", &source("api-prod", &app))
                .is_ok()
        );
        // Not listed: nothing, unless a person on the page.
        let err = access
            .check_scope("ci:gitlab", &source("api-prod", &app))
            .unwrap_err();
        assert!(format!("{err:?}").contains("no_scope"), "{err:?}");
        assert!(
            access
                .check_scope("web:ops@example.com", &source("api-prod", &app))
                .is_ok()
        );
    }

    #[test]
    fn reach_follows_the_scope_and_admin_sees_everything() {
        let app = format!("0x{}", "2e".repeat(20));
        let scopes = Scopes(vec![
            (
                "api:ops".into(),
                vec![
                    SourcePattern::Name("web-prod".into()),
                    SourcePattern::App(app.parse().unwrap()),
                ],
            ),
            (
                "ci:github".into(),
                vec![SourcePattern::Name("docs".into()), SourcePattern::Admin],
            ),
        ]);
        let api = parse_named_secrets("ops=token-12345678,other=token-87654321").unwrap();
        let ci = parse_named_secrets("github=secret-12345678").unwrap();
        let access = Access::new(&trust(scopes, Quotas::default()), &api, &ci).unwrap();
        assert_eq!(
            access.reach(&Actor::ApiClient("ops".into())),
            Reach::Sources {
                names: vec!["web-prod".into()],
                app_ids: vec![app.clone()]
            }
        );
        assert_eq!(access.reach(&Actor::CiClient("github".into())), Reach::All);
        assert!(access.is_admin("ci:github"));
        assert!(!access.is_admin("api:ops"));
        assert_eq!(
            access.reach(&Actor::ApiClient("other".into())),
            Reach::nothing()
        );
        assert_eq!(
            access.reach(&Actor::WebUser("ops@example.com".into())),
            Reach::All
        );
        // +admin alone queues nothing.
        let err = access
            .check_scope("ci:github", &source("web-prod", &"1f".repeat(20)))
            .unwrap_err();
        assert!(
            format!("{err:?}").contains("source_out_of_scope"),
            "{err:?}"
        );
    }

    #[test]
    fn quotas_fall_back_to_the_defaults_per_kind_of_kms() {
        let quotas = Quotas(vec![(
            "ci:github".into(),
            Quota {
                onchain: 7,
                cloud: 0,
            },
        )]);
        let (api, ci) = tokens();
        let access = Access::new(&trust(Scopes::default(), quotas), &api, &ci).unwrap();
        assert_eq!(access.quota("ci:github", true), 7);
        assert_eq!(access.quota("ci:github", false), 0);
        assert_eq!(access.quota("api:ops", true), Quota::DEFAULT.onchain);
        assert_eq!(access.quota("api:ops", false), Quota::DEFAULT.cloud);
    }

    #[test]
    fn a_scope_for_an_unknown_caller_stops_start_up() {
        let (api, ci) = tokens();
        let scopes = Scopes(vec![("ci:gihub".into(), vec![SourcePattern::Any])]);
        let err = Access::new(&trust(scopes, Quotas::default()), &api, &ci).unwrap_err();
        assert!(err.to_string().contains("ci:gihub"), "{err}");
        let quotas = Quotas(vec![("api:nobody".into(), Quota::DEFAULT)]);
        assert!(Access::new(&trust(Scopes::default(), quotas), &api, &ci).is_err());
    }
}
