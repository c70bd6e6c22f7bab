//! The notifications outbox. A status change that the team hears about
//! (`awaiting_approval`, `done`, `failed`) writes its notification in the
//! transaction that writes the change, so a crash neither loses one nor
//! makes one up; the notifier renders it, makes one delivery per target,
//! and delivers each with retries. A delivery's id is what the target sees
//! as the idempotency key: the same at every attempt.

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::{Store, clean};
use crate::domain::Status;

/// The statuses that notify, by their event name.
fn event_of(status: Status) -> Option<&'static str> {
    match status {
        Status::AwaitingApproval => Some("awaiting_approval"),
        Status::Done => Some("done"),
        Status::Failed => Some("failed"),
        _ => None,
    }
}

/// Records the notification a move to `to` causes, if any, in the
/// transaction of the move. `awaiting_approval` counts once per proposal
/// (the owners approve the proposal, whatever joins it later); `done` and
/// `failed` once per request.
pub(super) async fn record(
    tx: &mut Transaction<'_, Postgres>,
    request_id: Uuid,
    to: Status,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let Some(event) = event_of(to) else {
        return Ok(());
    };
    sqlx::query!(
        "INSERT INTO notifications (id, dedupe_key, event, request_id, proposal_id, created_at)
         SELECT $1, $2::text || ':' || CASE WHEN $2::text = 'awaiting_approval' AND proposal_id IS NOT NULL
                                      THEN 'proposal:' || proposal_id::text ELSE id::text END,
                $2::text, id, proposal_id, $3
         FROM replica_requests WHERE id = $4
         ON CONFLICT (dedupe_key) DO NOTHING",
        Uuid::now_v7(),
        event,
        now,
        request_id,
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A notification whose message is still to be written.
#[derive(Debug, Clone)]
pub struct PendingNotification {
    pub id: Uuid,
    pub event: String,
    pub request_id: Uuid,
    pub proposal_id: Option<Uuid>,
}

/// A delivery claimed for one attempt.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    /// The delivery id: the target's idempotency key.
    pub id: Uuid,
    pub target: String,
    pub attempts: i32,
    pub event: String,
    pub payload: String,
    pub lease_id: Uuid,
}

impl Store {
    /// Notifications with no message yet, oldest first.
    pub async fn notifications_to_render(
        &self,
        limit: i64,
    ) -> Result<Vec<PendingNotification>, sqlx::Error> {
        sqlx::query_as!(
            PendingNotification,
            "SELECT id, event, request_id, proposal_id FROM notifications
             WHERE payload IS NULL ORDER BY created_at, id LIMIT $1",
            limit,
        )
        .fetch_all(&self.pool)
        .await
    }

    /// Keeps the first message written for a notification.
    pub async fn set_notification_payload(
        &self,
        id: Uuid,
        payload: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query!(
            "UPDATE notifications SET payload = $2 WHERE id = $1 AND payload IS NULL",
            id,
            payload,
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Makes one delivery per target of every rendered notification that
    /// has none yet. Returns how many notifications were fanned out.
    pub async fn fan_out_notifications(
        &self,
        targets: &[String],
        now: DateTime<Utc>,
    ) -> Result<u64, sqlx::Error> {
        let done = sqlx::query!(
            "WITH pending AS (
                SELECT id FROM notifications WHERE NOT fanned_out AND payload IS NOT NULL
                ORDER BY created_at, id LIMIT 100 FOR UPDATE SKIP LOCKED),
             made AS (
                INSERT INTO notification_deliveries (id, notification_id, target, next_attempt_at)
                SELECT gen_random_uuid(), p.id, t.target, $2 FROM pending p CROSS JOIN unnest($1::text[]) AS t(target)
                ON CONFLICT (notification_id, target) DO NOTHING)
             UPDATE notifications SET fanned_out = true WHERE id IN (SELECT id FROM pending)",
            targets,
            now,
        )
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(done)
    }

    /// Claims the most overdue delivery to `target`, with a lease on the
    /// database's clock so two processes never send it at once.
    pub async fn claim_delivery(
        &self,
        target: &str,
        now: DateTime<Utc>,
        lease_for: std::time::Duration,
    ) -> Result<Option<DueDelivery>, sqlx::Error> {
        sqlx::query_as!(
            DueDelivery,
            "UPDATE notification_deliveries d SET lease_id = $1, lease_expires_at = now() + make_interval(secs => $2)
             FROM notifications n
             WHERE n.id = d.notification_id AND d.id = (
                SELECT id FROM notification_deliveries
                WHERE target = $3 AND delivered_at IS NULL AND gave_up_at IS NULL AND next_attempt_at <= $4
                  AND (lease_expires_at IS NULL OR lease_expires_at <= now())
                ORDER BY next_attempt_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING d.id AS \"id!\", d.target AS \"target!\", d.attempts AS \"attempts!\",
                n.event AS \"event!\", n.payload AS \"payload!\", d.lease_id AS \"lease_id!\"",
            Uuid::new_v4(),
            lease_for.as_secs_f64(),
            target,
            now,
        )
        .fetch_optional(&self.pool)
        .await
    }

    /// The target took the delivery.
    pub async fn delivery_succeeded(
        &self,
        delivery: &DueDelivery,
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query!(
            "UPDATE notification_deliveries SET delivered_at = $3, attempts = attempts + 1,
                last_error = NULL, lease_id = NULL, lease_expires_at = NULL
             WHERE id = $1 AND lease_id = $2",
            delivery.id,
            delivery.lease_id,
            now,
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The attempt failed: try again at `retry_at`, or give up (`None`).
    pub async fn delivery_failed(
        &self,
        delivery: &DueDelivery,
        now: DateTime<Utc>,
        error: &str,
        retry_at: Option<DateTime<Utc>>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query!(
            "UPDATE notification_deliveries SET attempts = attempts + 1, last_error = $3,
                next_attempt_at = COALESCE($4::timestamptz, next_attempt_at),
                gave_up_at = CASE WHEN $4::timestamptz IS NULL THEN $5::timestamptz END,
                lease_id = NULL, lease_expires_at = NULL
             WHERE id = $1 AND lease_id = $2",
            delivery.id,
            delivery.lease_id,
            clean(error),
            retry_at,
            now,
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// When the next delivery to `target` is due, if any is waiting.
    pub async fn next_delivery_due_at(
        &self,
        target: &str,
    ) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        sqlx::query_scalar!(
            "SELECT min(GREATEST(next_attempt_at, COALESCE(lease_expires_at, next_attempt_at)))
             FROM notification_deliveries
             WHERE target = $1 AND delivered_at IS NULL AND gave_up_at IS NULL",
            target,
        )
        .fetch_one(&self.pool)
        .await
    }
}
