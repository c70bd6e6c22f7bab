//! Notifications to the team's webhooks (Slack-compatible JSON) when owners
//! must approve a proposal, and when a replica is done or failed.
//!
//! The store writes each notification into an outbox in the transaction of
//! the status change (`store::outbox`); this module renders it once, makes
//! one delivery per target, and delivers each on the target's own task, with
//! retries and backoff. A slow or dead target delays only its own
//! deliveries, never the flow. Like `web`, it shows what the bridge knows,
//! pushed instead of pulled: it renders the signers' view
//! (`views::proposals`) and signs as the CI webhook is signed (`domain::signature`),
//! so a receiver checks a notification with the same code as a CI delivery.
//!
//! Headers: `X-Bridge-Timestamp`, `X-Bridge-Signature: sha256=<hex
//! HMAC-SHA256(secret, "{timestamp}.{delivery id}.{body}")>`,
//! `Idempotency-Key` and `X-Bridge-Delivery` (the delivery id, the same at
//! every attempt), `X-Bridge-Event`.

use std::time::Duration;

use anyhow::Context;
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::clock::Clock;
use crate::config::{NotifySettings, WorkerSettings};
use crate::domain::signature as webhook;
use crate::store::{DueDelivery, PendingNotification, Reach, ReplicaRequest, Store};
use crate::telemetry::redact;
use crate::views::proposals::{ProposalView, views_by_id};
use crate::worker::backoff;

/// How often an idle target's task looks for new notifications.
const POLL: Duration = Duration::from_secs(1);
/// Slack refuses a section longer than this.
const SECTION_LIMIT: usize = 3000;

#[derive(Clone)]
pub struct Notifier {
    store: Store,
    clock: Clock,
    targets: Vec<(String, Url)>,
    secret: SecretString,
    http: reqwest::Client,
    /// How long one attempt holds its delivery before another process may
    /// take it: well past the request timeout.
    lease: Duration,
    max_attempts: u32,
    backoff_base: Duration,
    backoff_max: Duration,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Target URLs carry tokens: names only.
        let names: Vec<&str> = self.targets.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Notifier")
            .field("targets", &names)
            .finish_non_exhaustive()
    }
}

impl Notifier {
    /// `None` when no target is configured.
    pub fn from_settings(
        store: Store,
        clock: Clock,
        settings: &NotifySettings,
        worker: &WorkerSettings,
    ) -> anyhow::Result<Option<Notifier>> {
        if settings.notify_urls.is_empty() {
            return Ok(None);
        }
        let secret = settings.notify_secret.clone().context(
            "APPROVAL_BRIDGE_NOTIFY_SECRET is required with APPROVAL_BRIDGE_NOTIFY_URLS",
        )?;
        let targets = settings
            .notify_urls
            .0
            .iter()
            .map(|(name, url)| {
                let url = Url::parse(url.expose_secret())
                    .with_context(|| format!("notification target `{name}` is not a URL"))?;
                Ok((name.clone(), url))
            })
            .collect::<anyhow::Result<_>>()?;
        let timeout = Duration::from_secs(settings.notify_timeout_secs);
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("approval-bridge/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Some(Notifier {
            store,
            clock,
            targets,
            secret,
            http,
            lease: timeout * 2 + Duration::from_secs(5),
            max_attempts: settings.notify_max_attempts,
            backoff_base: Duration::from_secs(worker.backoff_base_secs),
            backoff_max: Duration::from_secs(worker.backoff_max_secs),
        }))
    }

    /// Renders new notifications and fans them out to the targets. Returns
    /// how many were fanned out.
    pub async fn prepare_once(&self) -> anyhow::Result<u64> {
        for pending in self.store.notifications_to_render(50).await? {
            let message = self.render(&pending).await?;
            let body = serde_json::to_string(&message)?;
            self.store
                .set_notification_payload(pending.id, &body)
                .await?;
        }
        let names: Vec<String> = self.targets.iter().map(|(n, _)| n.clone()).collect();
        Ok(self
            .store
            .fan_out_notifications(&names, self.clock.now())
            .await?)
    }

    /// One due delivery to `target`, if any. `true` when one was attempted.
    pub async fn deliver_once(&self, target: usize) -> anyhow::Result<bool> {
        let (name, url) = &self.targets[target];
        let now = self.clock.now();
        let Some(delivery) = self.store.claim_delivery(name, now, self.lease).await? else {
            return Ok(false);
        };
        let outcome = self.send(url, &delivery).await;
        let now = self.clock.now();
        match outcome {
            Ok(()) => {
                tracing::info!(target = %name, delivery = %delivery.id, event = %delivery.event, "notification delivered");
                self.store.delivery_succeeded(&delivery, now).await?;
            }
            Err(error) => {
                let attempts = delivery.attempts as u32 + 1;
                let retry_at = (attempts < self.max_attempts)
                    .then(|| {
                        backoff::delay(
                            delivery.attempts as u32,
                            self.backoff_base,
                            self.backoff_max,
                        )
                    })
                    .map(|wait| chrono::Duration::from_std(wait).map(|w| now + w))
                    .transpose()?;
                tracing::warn!(target = %name, delivery = %delivery.id, attempts, error = %error, give_up = retry_at.is_none(), "notification not delivered");
                self.store
                    .delivery_failed(&delivery, now, &error, retry_at)
                    .await?;
            }
        }
        Ok(true)
    }

    /// Prepares and delivers until nothing is due now (tests drive it so).
    pub async fn drain(&self) -> anyhow::Result<usize> {
        let mut attempts = 0;
        self.prepare_once().await?;
        for target in 0..self.targets.len() {
            while self.deliver_once(target).await? {
                attempts += 1;
            }
        }
        Ok(attempts)
    }

    /// Runs until `shutdown`: one task prepares, one per target delivers.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tasks = tokio::task::JoinSet::new();
        let preparer = self.clone();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            while !stop.is_cancelled() {
                if let Err(err) = preparer.prepare_once().await {
                    tracing::error!(error = format!("{err:#}"), "cannot prepare notifications");
                }
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(POLL) => {}
                }
            }
        });
        for target in 0..self.targets.len() {
            let notifier = self.clone();
            let stop = shutdown.clone();
            tasks.spawn(async move { notifier.target_loop(target, stop).await });
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn target_loop(&self, target: usize, shutdown: CancellationToken) {
        let name = &self.targets[target].0;
        while !shutdown.is_cancelled() {
            // A shutdown drops an attempt under way: its lease runs out and
            // it is sent again, with the same delivery id.
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => break,
                attempt = self.deliver_once(target) => attempt,
            };
            let wait = match attempt {
                Ok(true) => continue,
                Ok(false) => match self.store.next_delivery_due_at(name).await {
                    Ok(Some(due)) => (due - self.clock.now())
                        .to_std()
                        .unwrap_or_default()
                        .min(POLL),
                    _ => POLL,
                },
                Err(err) => {
                    tracing::error!(target = %name, error = format!("{err:#}"), "notification delivery failed");
                    POLL
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(wait.max(Duration::from_millis(50))) => {}
            }
        }
    }

    /// POSTs the stored message, signed. Errors name the status or the
    /// failure, never the URL (it may carry a token).
    async fn send(&self, url: &Url, delivery: &DueDelivery) -> Result<(), String> {
        let timestamp = chrono::Utc::now().timestamp();
        let key = delivery.id.to_string();
        let signature = webhook::sign(
            self.secret.expose_secret(),
            timestamp,
            Some(&key),
            delivery.payload.as_bytes(),
        );
        let response = self
            .http
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(webhook::TIMESTAMP_HEADER, timestamp.to_string())
            .header(webhook::SIGNATURE_HEADER, signature)
            .header("Idempotency-Key", &key)
            .header(DELIVERY_HEADER, &key)
            .header(EVENT_HEADER, &delivery.event)
            .body(delivery.payload.clone())
            .send()
            .await
            .map_err(|err| {
                let err = err.without_url();
                if err.is_timeout() {
                    "timed out".to_owned()
                } else {
                    format!("could not be reached: {err}")
                }
            })?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("answered HTTP {}", status.as_u16()))
        }
    }

    async fn render(&self, pending: &PendingNotification) -> anyhow::Result<SlackMessage> {
        let request = self
            .store
            .get_request(pending.request_id)
            .await?
            .context("a notification's request exists (foreign key)")?;
        let proposal = match pending.proposal_id {
            Some(id) => views_by_id(&self.store, &[id], &Reach::All)
                .await?
                .remove(&id),
            None => None,
        };
        Ok(message(&pending.event, &request, proposal))
    }
}

pub const DELIVERY_HEADER: &str = "x-bridge-delivery";
pub const EVENT_HEADER: &str = "x-bridge-event";

/// A Slack incoming-webhook message: `text` (the fallback and the
/// notification line), `blocks`, and `metadata` with the event for programs.
#[derive(Debug, Clone, Serialize)]
pub struct SlackMessage {
    pub text: String,
    pub blocks: Vec<Block>,
    pub metadata: Metadata,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Block {
    Section { text: Text },
    Context { elements: Vec<Text> },
}

#[derive(Debug, Clone, Serialize)]
pub struct Text {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub text: String,
}

impl Text {
    fn mrkdwn(text: impl Into<String>) -> Text {
        let mut text: String = text.into();
        if text.len() > SECTION_LIMIT {
            let mut cut = SECTION_LIMIT - 1;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        }
        Text {
            kind: "mrkdwn",
            text,
        }
    }
}

/// Slack's message metadata: `event_type` and a payload of our own.
#[derive(Debug, Clone, Serialize)]
pub struct Metadata {
    pub event_type: String,
    pub event_payload: EventPayload,
}

#[derive(Debug, Clone, Serialize)]
pub struct EventPayload {
    pub request_id: Uuid,
    pub status: String,
    pub source: String,
    pub node: Option<String>,
    pub created_by: String,
    pub vm_uuid: Option<String>,
    pub error_code: Option<String>,
    pub proposal_id: Option<Uuid>,
    pub safe: Option<String>,
    pub safe_tx_hash: Option<String>,
    pub link: Option<String>,
    pub owners_to_sign: Vec<String>,
    /// Other CVMs this request's calls may have created besides its replica.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra_replicas: Vec<String>,
}

/// Text for Slack's mrkdwn: `&`, `<` and `>` as entities, as Slack asks
/// of every text it parses. Then a value from a caller, Phala or the chain
/// cannot make a mention (`<!channel>`, `<@U…>`) or a link that shows other
/// text than where it goes (`<http://evil|docs>`). The message's own markup
/// is written around the escaped values.
pub fn slack_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// The message of one notification, in the signers' human terms. Every
/// value is escaped for Slack (see [`slack_escape`]); the metadata keeps
/// them as they are, for programs.
pub fn message(event: &str, r: &ReplicaRequest, proposal: Option<ProposalView>) -> SlackMessage {
    let esc = |text: &str| slack_escape(text);
    let source = r.source_name.clone().unwrap_or_else(|| r.source.clone());
    let node = r.node_name.clone().or_else(|| r.node.clone());
    let replica = esc(&match &node {
        Some(node) => format!("{source} on {node}"),
        None => source.clone(),
    });
    let created_by = esc(&r.created_by);
    let mut blocks = Vec::new();
    let text = match (event, &proposal) {
        ("awaiting_approval", Some(p)) => {
            let (safe, summary, hash) = (esc(&p.safe), esc(&p.summary), esc(&p.safe_tx_hash));
            let requests = p.requests.len().max(1);
            let plural = if requests == 1 { "" } else { "s" };
            let text = format!(
                "Safe approval needed: Safe {safe} nonce {} unblocks {requests} replica request{plural} ({summary})",
                p.nonce
            );
            let sign = match &p.link {
                Some(link) => format!("<{}|Open in Safe{{Wallet}}>", esc(link)),
                None => format!("safeTxHash `{hash}`"),
            };
            blocks.push(Block::Section {
                text: Text::mrkdwn(format!(
                    "*Safe approval needed* on Safe `{safe}` (chain {}, nonce {}): {sign}",
                    p.chain_id, p.nonce
                )),
            });
            let calls: Vec<String> = p
                .calls
                .iter()
                .map(|c| format!("• {}", esc(&c.description)))
                .collect();
            blocks.push(Block::Section {
                text: Text::mrkdwn(calls.join("\n")),
            });
            let to_sign = if p.owners_to_sign.is_empty() {
                String::new()
            } else {
                format!(". Still to sign: {}", esc(&p.owners_to_sign.join(", ")))
            };
            blocks.push(Block::Context {
                elements: vec![Text::mrkdwn(format!(
                    "{summary}{to_sign}. safeTxHash {hash}"
                ))],
            });
            text
        }
        ("awaiting_approval", None) => {
            let text = format!(
                "Safe approval needed for the replica of {replica} (queued by {created_by})"
            );
            blocks.push(Block::Section {
                text: Text::mrkdwn(format!(
                    "*Safe approval needed* for the replica of {replica}"
                )),
            });
            text
        }
        ("done", _) => {
            let vm = esc(r.replica_vm_uuid.as_deref().unwrap_or("?"));
            let text = format!("Replica of {replica} is running: {vm} (queued by {created_by})");
            blocks.push(Block::Section {
                text: Text::mrkdwn(format!(
                    "*Replica done*: {replica}, CVM `{vm}`, queued by {created_by}"
                )),
            });
            text
        }
        (_, _) => {
            let code = esc(r.last_error_code.as_deref().unwrap_or("FAILED"));
            let why = r
                .last_error_message
                .as_deref()
                .map(|m| esc(&redact(m)))
                .unwrap_or_default();
            let text =
                format!("Replica of {replica} failed: {code}: {why} (queued by {created_by})");
            let mut detail =
                format!("*Replica failed*: {replica}, queued by {created_by}\n`{code}` {why}");
            if let Some(suggestion) = &r.last_error_suggestion {
                detail.push_str(&format!("\n{}", esc(&redact(suggestion))));
            }
            blocks.push(Block::Section {
                text: Text::mrkdwn(detail),
            });
            text
        }
    };
    // Never let a second CVM for one request pass unnoticed.
    let text = if r.extra_replicas.is_empty() {
        text
    } else {
        let extra = esc(&r.extra_replicas.join(", "));
        blocks.push(Block::Section {
            text: Text::mrkdwn(format!(
                "*Warning: more than one CVM* may have been created for this request. Besides its replica, Phala lists `{extra}`: look at them on the Phala dashboard and remove the one you do not want."
            )),
        });
        format!(
            "{text}. Warning: more than one CVM may have been created for this request (also {extra})"
        )
    };
    blocks.push(Block::Context {
        elements: vec![Text::mrkdwn(format!("request {}", r.id))],
    });
    SlackMessage {
        text,
        blocks,
        metadata: Metadata {
            event_type: event.to_owned(),
            event_payload: EventPayload {
                request_id: r.id,
                status: r.status().to_string(),
                source,
                node,
                created_by: r.created_by.clone(),
                vm_uuid: r.replica_vm_uuid.clone(),
                extra_replicas: r.extra_replicas.clone(),
                error_code: r.last_error_code.clone(),
                proposal_id: proposal.as_ref().map(|p| p.id),
                safe: proposal.as_ref().map(|p| p.safe.clone()),
                safe_tx_hash: proposal.as_ref().map(|p| p.safe_tx_hash.clone()),
                link: proposal.as_ref().and_then(|p| p.link.clone()),
                owners_to_sign: proposal.map(|p| p.owners_to_sign).unwrap_or_default(),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Status;
    use crate::store::StatusColumn;

    const HOSTILE: &str = "<!channel> <@U024BE7LH> <http://evil.example|docs> & more";

    fn request(status: Status) -> ReplicaRequest {
        let now = chrono::Utc::now();
        ReplicaRequest {
            id: Uuid::nil(),
            status: StatusColumn(status),
            source: HOSTILE.into(),
            node: Some(format!("node {HOSTILE}")),
            requested_compose_hash: None,
            env_names: Vec::new(),
            note: Some(HOSTILE.into()),
            encrypted_env: None,
            created_by: format!("api:{HOSTILE}"),
            source_vm_uuid: "vm".into(),
            source_name: Some(format!("source {HOSTILE}")),
            node_id: None,
            node_name: None,
            kms_type: None,
            onchain_kms: true,
            app_id: None,
            chain_id: None,
            compose_hash: None,
            device_id: None,
            compose_hash_allowed: None,
            device_id_allowed: None,
            prepared_at: None,
            commit_tx_hash: None,
            call_sent_at: None,
            replica_vm_uuid: Some(format!("vm {HOSTILE}")),
            replica_status: None,
            attempts: 0,
            next_attempt_at: now,
            last_error_code: Some(format!("CODE{HOSTILE}")),
            last_error_message: Some(format!("Phala said {HOSTILE}")),
            last_error_suggestion: Some(format!("try {HOSTILE}")),
            created_at: now,
            updated_at: now,
            proposal_id: None,
            safe: None,
            workspace_slug: None,
            instances_before: None,
            outcome_unknown_since: None,
            settles_at: None,
            first_call_took_effect_at: None,
            extra_replicas: vec![format!("cvm {HOSTILE}")],
            expected_device_id: None,
            http_request_id: None,
            kind: crate::domain::ChangeKind::Replica,
        }
    }

    fn texts(message: &SlackMessage) -> Vec<String> {
        let mut texts = vec![message.text.clone()];
        for block in &message.blocks {
            match block {
                Block::Section { text } => texts.push(text.text.clone()),
                Block::Context { elements } => {
                    texts.extend(elements.iter().map(|t| t.text.clone()))
                }
            }
        }
        texts
    }

    #[test]
    fn slack_escape_turns_the_three_control_characters_into_entities() {
        assert_eq!(
            slack_escape("<!here> a & b <@U1|x>"),
            "&lt;!here&gt; a &amp; b &lt;@U1|x&gt;"
        );
        assert_eq!(slack_escape("plain *text* `ok`"), "plain *text* `ok`");
        // Escaped once, not again: `&amp;` in the input is shown as typed.
        assert_eq!(slack_escape("&amp;"), "&amp;amp;");
    }

    #[test]
    fn mentions_and_disguised_links_in_fields_do_not_reach_slack() {
        for status in [Status::Failed, Status::Done, Status::AwaitingApproval] {
            let event = match status {
                Status::Failed => "failed",
                Status::Done => "done",
                _ => "awaiting_approval",
            };
            let message = message(event, &request(status), None);
            let texts = texts(&message);
            assert!(texts.len() >= 3, "{texts:?}");
            for text in &texts {
                assert!(
                    !text.contains('<') && !text.contains('>'),
                    "{event}: {text}"
                );
                assert!(!text.contains("& more"), "{event}: {text}");
            }
            let all = texts.join("\n");
            assert!(all.contains("&lt;!channel&gt;"), "{event}: {all}");
            assert!(
                all.contains("&lt;http://evil.example|docs&gt;"),
                "{event}: {all}"
            );
            // Programs get the values as they are.
            assert_eq!(
                message.metadata.event_payload.created_by,
                format!("api:{HOSTILE}")
            );
        }
    }
}
