//! `approval-bridge sessions sign-out`: ends the team page's sessions of one
//! person, or of everyone, e.g. after a key is lost or a laptop stolen. The
//! page's own "Sign out everywhere" does the first for the person signed in,
//! and an admin token does either with `POST /api/v1/sessions/sign-out`.

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::config::DatabaseSettings;
use crate::store::{self, Store};

#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// End page sessions: every session of `--subject`, or with `--all`
    /// every session of everyone. Prints how many ended.
    SignOut(SignOutArgs),
}

#[derive(Debug, Args)]
pub struct SignOutArgs {
    #[command(flatten)]
    pub who: Who,

    #[command(flatten)]
    pub database: DatabaseSettings,
}

/// Whose sessions: one person's, or everyone's.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Who {
    /// The person: an address (as the page shows it) or a user name.
    #[arg(long)]
    pub subject: Option<String>,

    /// Everyone.
    #[arg(long)]
    pub all: bool,
}

pub async fn run(command: SessionsCommand) -> anyhow::Result<()> {
    let SessionsCommand::SignOut(args) = command;
    let pool = store::connect(&args.database).await?;
    let store = Store::new(pool);
    let ended = match &args.who.subject {
        Some(subject) => {
            let subject = crate::domain::session_subject(subject);
            let ended = store
                .delete_web_sessions_of(&subject)
                .await
                .context("ending the sessions")?;
            println!("{ended} session(s) of {subject} ended");
            ended
        }
        None => {
            let ended = store
                .delete_all_web_sessions()
                .await
                .context("ending the sessions")?;
            println!("{ended} session(s) ended");
            ended
        }
    };
    tracing::info!(
        sessions = ended,
        "page sessions ended from the command line"
    );
    Ok(())
}
