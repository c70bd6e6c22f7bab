//! Storing orders: the requests of orders that arrived together, in one
//! transaction, each order checked against its caller's quota and
//! idempotency key as if it had come alone.
//!
//! The fixed cost of an order's transaction (its BEGIN and COMMIT, the
//! callers' locks, the count of their hour, the read-back, the NOTIFY) is
//! paid once per batch: under a burst, intake costs Postgres little more
//! than the rows it writes.
//!
//! Quotas are counted here, in Postgres, so that every process agrees.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::idempotency::answer_under_key;
use super::requests::wake;
use super::{IdempotencyOutcome, NewRequest, ReplicaRequest, Store, StoredResponse, clean};
use crate::domain::Actor;

/// The window a caller's hourly quota counts.
pub const QUOTA_WINDOW: chrono::Duration = chrono::Duration::hours(1);

enum QuotaCheck {
    Within,
    /// Inserting would go over: `used` requests are in the window, and enough
    /// of them leave it after `retry_after`.
    Exceeded {
        used: i64,
        retry_after: chrono::Duration,
    },
}

/// One order to store: requests that differ only in their id.
#[derive(Debug, Clone)]
pub struct Order {
    pub actor: Actor,
    pub requests: Vec<NewRequest>,
    /// The caller's quota for the order's kind of KMS, per hour.
    pub limit: u32,
    pub idempotency: Option<IdempotencyKey>,
}

/// An `Idempotency-Key` and the hash of the body it came with.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    pub key: String,
    pub request_hash: Vec<u8>,
}

/// What became of one order.
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    /// Stored; the answer, as the caller's `render` made it.
    Created(StoredResponse),
    /// Its key was used before: answer as then, or refuse a different body.
    Earlier(IdempotencyOutcome),
    /// Over the caller's quota: nothing stored.
    OverQuota {
        used: i64,
        retry_after: chrono::Duration,
    },
}

/// A caller's requests in its quota window, by kind of KMS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QuotaUsed {
    pub onchain: i64,
    pub cloud: i64,
}

impl QuotaUsed {
    pub fn of(&self, onchain_kms: bool) -> i64 {
        if onchain_kms {
            self.onchain
        } else {
            self.cloud
        }
    }
}

impl Order {
    fn caller(&self) -> String {
        self.actor.label()
    }

    fn onchain_kms(&self) -> bool {
        self.requests.first().is_some_and(|r| r.onchain_kms)
    }
}

impl Store {
    /// Stores `orders` in one transaction, in their order, and wakes the
    /// workers when it commits. `render` makes an order's answer from its
    /// stored requests (saved under its idempotency key too). Each caller's
    /// lock is held from the count of its hour to the commit, so two
    /// processes never both spend the last slot or both use one key.
    pub async fn store_orders(
        &self,
        orders: &[Order],
        now: DateTime<Utc>,
        keys_expired_before: DateTime<Utc>,
        render: &(dyn Fn(&[ReplicaRequest]) -> anyhow::Result<StoredResponse> + Sync),
    ) -> anyhow::Result<Vec<Stored>> {
        let mut callers: Vec<String> = orders.iter().map(Order::caller).collect();
        callers.sort();
        callers.dedup();
        let mut tx = self.pool.begin().await?;
        lock_callers(&mut tx, &callers).await?;
        let sources: Vec<String> = orders
            .iter()
            .flat_map(|o| o.requests.iter().map(|r| r.source_vm_uuid.clone()))
            .collect();
        lock_sources(&mut tx, &sources).await?;
        let since = now - QUOTA_WINDOW;
        let mut used = used_by(&mut *tx, &callers, since).await?;

        let mut outcomes = Vec::with_capacity(orders.len());
        let mut created: Vec<Uuid> = Vec::new();
        // The requests of the orders without a key, inserted together at the end.
        let mut deferred: Vec<(&NewRequest, String)> = Vec::new();
        for order in orders {
            let caller = order.caller();
            if let Some(key) = &order.idempotency
                && let Some(earlier) = answer_under_key(
                    &mut *tx,
                    &caller,
                    &key.key,
                    &key.request_hash,
                    keys_expired_before,
                )
                .await?
            {
                outcomes.push(Some(Stored::Earlier(earlier)));
                continue;
            }
            let kind = (caller.clone(), order.onchain_kms());
            let in_window = used.get(&kind).copied().unwrap_or(0);
            let (wanted, limit) = (order.requests.len() as i64, i64::from(order.limit));
            let check = quota_check(&mut *tx, &kind, in_window, wanted, limit, since, now).await?;
            if let QuotaCheck::Exceeded { used, retry_after } = check {
                outcomes.push(Some(Stored::OverQuota { used, retry_after }));
                continue;
            }
            used.insert(kind, in_window + order.requests.len() as i64);
            let rows = order.requests.iter().map(|r| (r, caller.clone()));
            let ids: Vec<Uuid> = order.requests.iter().map(|r| r.id).collect();
            if let Some(key) = &order.idempotency {
                insert_requests(&mut tx, &rows.collect::<Vec<_>>(), now).await?;
                // Saved now, so that a later order of the batch with the same key finds it.
                let response = render(&Store::requests_in(&mut tx, &ids).await?)?;
                // Under the caller's lock no other process can have saved it since.
                Store::save_idempotent_response(
                    &mut tx,
                    &caller,
                    &key.key,
                    &key.request_hash,
                    &response,
                    now,
                    keys_expired_before,
                )
                .await?;
                outcomes.push(Some(Stored::Created(response)));
            } else {
                deferred.extend(rows);
                outcomes.push(None);
            }
            created.extend(ids);
        }
        insert_requests(&mut tx, &deferred, now).await?;

        // The answers of the orders without a key, from one read.
        let rows = Store::requests_in(&mut tx, &created).await?;
        let by_id: HashMap<Uuid, &ReplicaRequest> = rows.iter().map(|r| (r.id, r)).collect();
        let mut answers = Vec::with_capacity(orders.len());
        for (order, outcome) in orders.iter().zip(outcomes) {
            answers.push(match outcome {
                Some(outcome) => outcome,
                None => {
                    let mine: Vec<ReplicaRequest> = order
                        .requests
                        .iter()
                        .filter_map(|r| by_id.get(&r.id).map(|row| (*row).clone()))
                        .collect();
                    Stored::Created(render(&mine)?)
                }
            });
        }
        if !created.is_empty() {
            wake(&mut tx).await?;
        }
        match tx.commit().await {
            Ok(()) => Ok(answers),
            // No answer to the COMMIT: it may have been applied. The answers
            // above are the batch's as committed, if it was.
            Err(err) if answer_lost(&err) && !created.is_empty() => {
                tracing::warn!(error = %err, orders = orders.len(), "the COMMIT of a batch of orders got no answer; looking for its requests");
                match self.committed(&callers, &created).await {
                    Ok(true) => Ok(answers),
                    Ok(false) => Err(LostCommit::NotStored.into()),
                    Err(look) => Err(LostCommit::Unknown(format!("{look:#}")).into()),
                }
            }
            Err(err) => Err(err.into()),
        }
    }

    /// `caller`'s requests of the last hour, by kind of KMS, read without its
    /// quota lock: intake's look before it calls anyone. The count under the
    /// lock, in [`Store::store_orders`], decides.
    pub async fn quota_used(
        &self,
        caller: &str,
        now: DateTime<Utc>,
    ) -> Result<QuotaUsed, sqlx::Error> {
        let caller = caller.to_owned();
        let used = used_by(
            &self.pool,
            std::slice::from_ref(&caller),
            now - QUOTA_WINDOW,
        )
        .await?;
        let of = |onchain_kms| {
            used.get(&(caller.clone(), onchain_kms))
                .copied()
                .unwrap_or(0)
        };
        Ok(QuotaUsed {
            onchain: of(true),
            cloud: of(false),
        })
    }

    /// `None` when `wanted` more requests of one kind of KMS fit beside the
    /// `used` of `caller`'s hour and its `limit`; else how long until they
    /// would. Read without the caller's lock, as [`Store::quota_used`].
    pub async fn quota_wait(
        &self,
        caller: &str,
        onchain_kms: bool,
        used: i64,
        wanted: u32,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Option<chrono::Duration>, sqlx::Error> {
        let kind = (caller.to_owned(), onchain_kms);
        let (wanted, limit) = (i64::from(wanted), i64::from(limit));
        let check = quota_check(
            &self.pool,
            &kind,
            used,
            wanted,
            limit,
            now - QUOTA_WINDOW,
            now,
        );
        Ok(match check.await? {
            QuotaCheck::Within => None,
            QuotaCheck::Exceeded { retry_after, .. } => Some(retry_after),
        })
    }

    /// Whether the requests `ids` of a batch whose COMMIT got no answer are
    /// stored, looked up on another connection. The callers' quota locks are
    /// taken first: the batch's transaction holds them until it commits or
    /// aborts, so the answer is final, not a look while it is still under way.
    async fn committed(&self, callers: &[String], ids: &[Uuid]) -> anyhow::Result<bool> {
        let mut tx = self.pool.begin().await?;
        lock_callers(&mut tx, callers).await?;
        let found = sqlx::query_scalar!(
            r#"SELECT count(*) AS "found!" FROM replica_requests WHERE id = ANY($1)"#,
            ids,
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        // One transaction wrote them all: all or none.
        match found {
            0 => Ok(false),
            n if n as usize == ids.len() => Ok(true),
            n => anyhow::bail!("{n} of the batch's {} requests are stored", ids.len()),
        }
    }
}

/// The connection broke, or the server's answer made no sense: the statement
/// may or may not have been applied. An error the server sent is an answer.
fn answer_lost(err: &sqlx::Error) -> bool {
    matches!(
        err,
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed
    )
}

/// The COMMIT of a batch of orders got no answer (the connection broke).
#[derive(Debug, Clone, thiserror::Error)]
pub enum LostCommit {
    /// A look on another connection found none of its requests.
    #[error(
        "the connection to the database broke while the order was committed, and it was not stored"
    )]
    NotStored,
    /// The look failed too.
    #[error(
        "the connection to the database broke while the order was committed, and whether it was stored is not known yet: {0}"
    )]
    Unknown(String),
}

/// Takes each caller's quota lock, in one order for every process.
async fn lock_callers(
    tx: &mut Transaction<'_, Postgres>,
    callers: &[String],
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "SELECT pg_advisory_xact_lock(hashtextextended('quota:' || caller, 0))
         FROM (SELECT caller FROM unnest($1::text[]) AS c(caller) ORDER BY caller) AS sorted",
        callers,
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(())
}

/// Takes the lock of each source CVM the batch queues replicas of, until
/// the commit, in one order for every process: the follower takes it before
/// it revives a request whose expired proposal was executed late, so it
/// sees a newer request for the same replica that is being stored now
/// (`store::follower`), and never revives the old one beside it.
async fn lock_sources(
    tx: &mut Transaction<'_, Postgres>,
    sources: &[String],
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "SELECT pg_advisory_xact_lock(hashtextextended('replica-source:' || source, 0))
         FROM (SELECT DISTINCT source FROM unnest($1::text[]) AS s(source) ORDER BY source) AS sorted",
        sources,
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(())
}

/// Each caller's requests of each kind of KMS since `since`. A statement of
/// its own, after the locks: its snapshot sees what their previous holders
/// committed.
async fn used_by<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    callers: &[String],
    since: DateTime<Utc>,
) -> Result<HashMap<(String, bool), i64>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT created_by, onchain_kms, count(*) AS "used!" FROM replica_requests
         WHERE created_by = ANY($1) AND created_at > $2
         GROUP BY created_by, onchain_kms"#,
        callers,
        since,
    )
    .fetch_all(executor)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| ((r.created_by, r.onchain_kms), r.used))
        .collect())
}

/// Whether `wanted` requests fit beside the `used` requests of the caller's
/// hour. When they do not, enough of them leave the window after
/// `retry_after` (never, if it asks for more than the whole quota: then the
/// window's length).
async fn quota_check<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    (caller, onchain_kms): &(String, bool),
    used: i64,
    wanted: i64,
    limit: i64,
    since: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<QuotaCheck, sqlx::Error> {
    if used + wanted <= limit {
        return Ok(QuotaCheck::Within);
    }
    if wanted > limit {
        return Ok(QuotaCheck::Exceeded {
            used,
            retry_after: QUOTA_WINDOW,
        });
    }
    // The request that must leave the window first is the (used + wanted - limit)th oldest.
    // Orders of this batch not inserted yet are the newest (created `now`).
    let must_leave = used + wanted - limit;
    let oldest: Option<DateTime<Utc>> = sqlx::query_scalar!(
        "SELECT created_at FROM replica_requests
         WHERE created_by = $1 AND onchain_kms = $2 AND created_at > $3
         ORDER BY created_at OFFSET $4 LIMIT 1",
        caller,
        onchain_kms,
        since,
        must_leave - 1,
    )
    .fetch_optional(executor)
    .await?;
    Ok(QuotaCheck::Exceeded {
        used,
        retry_after: oldest.unwrap_or(now) + QUOTA_WINDOW - now,
    })
}

/// Requests, each with its first event (`queued`, by the caller it is
/// paired with), in one statement whatever their number.
async fn insert_requests(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[(&NewRequest, String)],
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let column = |f: fn(&NewRequest) -> Option<String>| -> Vec<Option<String>> {
        rows.iter().map(|(r, _)| f(r)).collect()
    };
    let ids: Vec<Uuid> = rows.iter().map(|(r, _)| r.id).collect();
    let callers: Vec<String> = rows.iter().map(|(_, caller)| caller.clone()).collect();
    let env_names: Vec<serde_json::Value> = rows
        .iter()
        .map(|(r, _)| serde_json::json!(r.env_names))
        .collect();
    let messages = column(|r| r.note.as_deref().map(clean));
    sqlx::query!(
        "WITH created AS (
            INSERT INTO replica_requests (id, status, source, node, requested_compose_hash, env_names, note,
                encrypted_env, created_by, source_vm_uuid, source_name, node_id, node_name, kms_type, onchain_kms,
                app_id, chain_id, next_attempt_at, created_at, updated_at, workspace_slug, expected_device_id,
                http_request_id)
            SELECT r.id, 'queued', r.source, r.node, r.requested_compose_hash,
                ARRAY(SELECT jsonb_array_elements_text(r.env_names)), r.note, r.encrypted_env, r.created_by,
                r.source_vm_uuid, r.source_name, r.node_id, r.node_name, r.kms_type, r.onchain_kms, r.app_id,
                r.chain_id, $20, $20, $20, r.workspace_slug, r.expected_device_id, r.http_request_id
            FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::text[], $7::text[],
                    $8::text[], $9::text[], $10::text[], $11::int4[], $12::text[], $13::text[], $14::bool[],
                    $15::text[], $16::int8[], $17::text[], $18::text[], $19::text[])
                AS r(id, source, node, requested_compose_hash, env_names, note, encrypted_env, created_by,
                    source_vm_uuid, source_name, node_id, node_name, kms_type, onchain_kms, app_id, chain_id,
                    workspace_slug, expected_device_id, http_request_id)
            RETURNING id, created_by)
         INSERT INTO request_events (request_id, from_status, to_status, actor, message, created_at)
         SELECT c.id, NULL, 'queued', c.created_by, m.message, $20
         FROM created c JOIN unnest($1::uuid[], $21::text[]) AS m(id, message) ON m.id = c.id",
        &ids,
        &rows.iter().map(|(r, _)| r.source.clone()).collect::<Vec<_>>(),
        &column(|r| r.node.clone()) as &[Option<String>],
        &column(|r| r.requested_compose_hash.clone()) as &[Option<String>],
        &env_names,
        &column(|r| r.note.clone()) as &[Option<String>],
        &column(|r| r.encrypted_env.clone()) as &[Option<String>],
        &callers,
        &rows.iter().map(|(r, _)| r.source_vm_uuid.clone()).collect::<Vec<_>>(),
        &column(|r| r.source_name.clone()) as &[Option<String>],
        &rows.iter().map(|(r, _)| r.node_id).collect::<Vec<_>>() as &[Option<i32>],
        &column(|r| r.node_name.clone()) as &[Option<String>],
        &column(|r| r.kms_type.clone()) as &[Option<String>],
        &rows.iter().map(|(r, _)| r.onchain_kms).collect::<Vec<_>>(),
        &column(|r| r.app_id.clone()) as &[Option<String>],
        &rows.iter().map(|(r, _)| r.chain_id).collect::<Vec<_>>() as &[Option<i64>],
        &column(|r| r.workspace_slug.clone()) as &[Option<String>],
        &column(|r| r.expected_device_id.clone()) as &[Option<String>],
        &column(|r| r.http_request_id.clone()) as &[Option<String>],
        now,
        &messages as &[Option<String>],
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}
