//! Server-rendered pages (askama) and small service endpoints: the team page
//! (`ui`, with its models and words) and the index, the stylesheet and the
//! JSON 404.

pub mod replication;
pub mod ui;
mod ui_models;
mod ui_people;

use askama::Template;
use axum::response::{Html, IntoResponse};

use crate::web::error::ApiError;

#[derive(Template)]
#[template(path = "index.html")]
struct IndexPage {
    version: &'static str,
}

/// `GET /`: what this service is and where its API lives.
pub async fn index() -> Result<Html<String>, ApiError> {
    let page = IndexPage {
        version: env!("CARGO_PKG_VERSION"),
    };
    Ok(Html(page.render()?))
}

/// The stylesheet, built into the binary so it needs no files at run time.
pub async fn stylesheet() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../../../static/style.css"),
    )
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}
