//! What each caller may ask for: the sources in its scope and its hourly
//! quota of replicas (see `TrustSettings`). Quotas are counted in Postgres
//! by intake, in the transaction that inserts.

use anyhow::bail;

use super::error::ApiError;
use crate::config::{NamedSecrets, Quota, Quotas, Scopes, SourcePattern, TrustSettings};
use crate::phala::ResolvedSource;

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
        Ok(Access {
            scopes: trust.scopes.clone(),
            quotas: trust.quotas.clone(),
            default_quota: Quota {
                onchain: trust.quota_per_hour,
                cloud: trust.cloud_quota_per_hour,
            },
        })
    }

    /// Whether `caller` (an actor label) may replicate `source`. A caller
    /// without a scope may replicate any source.
    pub fn check_scope(&self, caller: &str, source: &ResolvedSource) -> Result<(), ApiError> {
        let Some((_, patterns)) = self.scopes.0.iter().find(|(c, _)| c == caller) else {
            return Ok(());
        };
        let app = source.app_id();
        let allowed = patterns.iter().any(|pattern| match pattern {
            SourcePattern::Any => true,
            SourcePattern::Name(name) => source.cvm.name.as_deref() == Some(name.as_str()),
            SourcePattern::App(id) => app == Some(*id),
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
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ))
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
    fn scopes_match_names_and_app_ids_and_leave_others_free() {
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
        // Not listed: any source.
        assert!(
            access
                .check_scope("ci:gitlab", &source("api-prod", &app))
                .is_ok()
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
