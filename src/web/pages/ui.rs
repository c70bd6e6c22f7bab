//! The team page: the replicas list, the queue form, a request's detail,
//! sign-in and sign-out. Server-rendered (askama); every form is a plain POST
//! answered by a redirect, so it all works without JavaScript, and
//! `static/app.js` only adds live updates, the wallet sign-in and the env
//! checks. Queue and cancel go through the JSON API's own code
//! ([`intake::queue`], [`replicas::cancel_as`]) with the signed-in person as
//! the actor, so scopes, quotas and validation are the API's.

use std::collections::BTreeMap;
use std::sync::Arc;

use askama::Template;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::header::{ACCEPT, LOCATION, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::domain::{InvalidOrder, ReplicaOrder, Status};
use crate::store::{Reach, RequestFilter};
use crate::telemetry::redact;
use crate::views::proposals::open_proposals;
use crate::views::requests as views;
use crate::web::AppState;
use crate::web::api::intake;
use crate::web::api::replicas::{cancel_as, detail_of, parse_id, proposals_of};
use crate::web::auth::signin::{
    self, CSRF_FIELD, PROXY_SECRET_HEADER, PageUser, SignInRequired, SignedIn, check_csrf,
    csrf_token, sign_out,
};
use crate::web::error::ApiError;
use crate::web::pages::replication::{FormFacts, NodeChoice, form_facts};
use crate::web::pages::ui_models::{DetailView, ProposalPage, RowView};
use crate::web::pages::ui_people::{People, Person, page_words, status_words};

const LIST_LIMIT: i64 = 100;

/// The team page's routes that anyone may call: sign-in, sign-out and the
/// script (pages, not the JSON API: the OpenAPI description leaves them
/// out). Its forms carry CSRF tokens (see `signin`).
pub fn open_routes() -> Router<AppState> {
    Router::new()
        .route("/login", get(login).post(signin::sign_in))
        .route("/login/message", post(signin::message))
        .route("/logout", post(logout))
        .route("/static/app.js", get(script))
}

/// The team page's routes for people signed in.
pub fn signed_in_routes() -> Router<AppState> {
    Router::new()
        .route("/replicas", get(list).post(queue))
        .route("/replicas/rows", get(rows_partial))
        .route("/replicas/new", get(new_form))
        .route("/replicas/{id}", get(detail))
        .route("/replicas/{id}/live", get(live_partial))
        .route("/replicas/{id}/cancel", post(cancel))
        .route("/proposals", get(proposals))
        .route("/proposals/live", get(proposals_partial))
}

/// What every page's frame shows: who is signed in, and the CSRF token.
pub struct Chrome {
    pub csrf: String,
    pub user: Option<Person>,
    pub operator: bool,
}

/// How the page names people for `user`: "you" for them.
fn people(state: &AppState, user: &PageUser) -> People {
    People::new(&state.names, Some(&user.subject)).with_ens(&state.ens, state.chains.configured())
}

/// An answer to a page request: HTML with the CSRF cookie when it is new.
fn html(
    body: Result<String, askama::Error>,
    status: StatusCode,
    cookie: Option<HeaderValue>,
) -> Response {
    match body {
        Ok(body) => {
            let mut response = (status, Html(body)).into_response();
            if let Some(cookie) = cookie {
                response.headers_mut().append(SET_COOKIE, cookie);
            }
            response
        }
        Err(err) => ApiError::from(err).into_response(),
    }
}

fn chrome(
    state: &AppState,
    headers: &HeaderMap,
    user: Option<&PageUser>,
) -> (Chrome, Option<HeaderValue>) {
    let (csrf, cookie) = csrf_token(&state.page_auth, headers);
    (
        Chrome {
            csrf,
            // In the header, by name (or short address), not as "you".
            user: user.map(|u| People::new(&state.names, None).person(&u.subject)),
            operator: user.is_some_and(PageUser::is_operator),
        },
        cookie,
    )
}

#[derive(Template)]
#[template(path = "page/message.html")]
struct MessagePage<'a> {
    chrome: Chrome,
    title: &'a str,
    message: &'a str,
    sign_in_link: bool,
}

/// A page that says one thing: a refusal or an error, redacted as logs are.
pub fn message_page(
    status: StatusCode,
    title: &str,
    message: &str,
    sign_in_link: bool,
) -> Response {
    let chrome = Chrome {
        csrf: String::new(),
        user: None,
        operator: false,
    };
    framed_message(chrome, status, title, message, sign_in_link, None)
}

fn framed_message(
    chrome: Chrome,
    status: StatusCode,
    title: &str,
    message: &str,
    sign_in_link: bool,
    cookie: Option<HeaderValue>,
) -> Response {
    let message = &page_words(&redact(message));
    let page = MessagePage {
        chrome,
        title,
        message,
        sign_in_link,
    };
    html(page.render(), status, cookie)
}

/// An error page that a handler of a signed-in person answered: the frame
/// adds the person's header ([`keep_header`]).
#[derive(Clone)]
struct ErrorPage {
    status: StatusCode,
    title: &'static str,
    message: String,
}

/// A page request that is not signed in: sent to sign in, or told why not
/// (auth decides who is signed in; the page shows the refusal).
impl IntoResponse for SignInRequired {
    fn into_response(self) -> Response {
        let (status, message, forget) = match self {
            SignInRequired::Anonymous => {
                return (
                    StatusCode::SEE_OTHER,
                    [(axum::http::header::LOCATION, "/login")],
                )
                    .into_response();
            }
            SignInRequired::InvalidSession(forget) => (
                StatusCode::UNAUTHORIZED,
                "Your session is not valid (it ended, expired or was altered). Sign in again."
                    .to_owned(),
                Some(forget),
            ),
            SignInRequired::Revoked(subject, forget) => (
                StatusCode::UNAUTHORIZED,
                format!(
                    "{subject} is no longer an operator or an owner of a configured Safe, so the session has ended."
                ),
                Some(forget),
            ),
            SignInRequired::UntrustedProxy(header) => (
                StatusCode::FORBIDDEN,
                format!(
                    "The {header} header came from an address that is not a trusted proxy; it was ignored and nobody is signed in."
                ),
                None,
            ),
            SignInRequired::ProxySecretMissing(header) => (
                StatusCode::FORBIDDEN,
                format!(
                    "The {header} header came without the proxy's secret in {PROXY_SECRET_HEADER}; it was ignored and nobody is signed in."
                ),
                None,
            ),
            SignInRequired::Internal(err) => return err.into_response(),
        };
        let mut response = message_page(status, "Not signed in", &message, true);
        if let Some(forget) = forget {
            response.headers_mut().append(SET_COOKIE, forget);
        }
        response
    }
}

/// Layered over the page's routes: an error page answered after the person
/// was known is shown with their header (who, role, sign out), as every
/// other page is.
pub async fn keep_header(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let slot = SignedIn::default();
    request.extensions_mut().insert(slot.clone());
    let headers = request.headers().clone();
    let response = next.run(request).await;
    let (Some(error), Some(user)) = (
        response.extensions().get::<ErrorPage>().cloned(),
        slot.0.get(),
    ) else {
        return response;
    };
    let (chrome, cookie) = chrome(&state, &headers, Some(user));
    framed_message(
        chrome,
        error.status,
        error.title,
        &error.message,
        false,
        cookie,
    )
}

/// A path nobody serves: for a browser, a page with the person's header;
/// for the API and everything else, the JSON 404.
pub async fn not_found(State(state): State<AppState>, request: Request) -> Response {
    let path = request.uri().path().to_owned();
    let browser = request
        .headers()
        .get(ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if !browser || path.starts_with("/api/") || path.starts_with("/webhooks/") {
        return crate::web::pages::not_found().await.into_response();
    }
    let (mut parts, _) = request.into_parts();
    let user = PageUser::from_request_parts(&mut parts, &state).await.ok();
    let (chrome, cookie) = chrome(&state, &parts.headers, user.as_ref());
    framed_message(
        chrome,
        StatusCode::NOT_FOUND,
        "Not found",
        &format!("There is no page at {path}."),
        user.is_none(),
        cookie,
    )
}

/// An [`ApiError`] shown as a page.
pub struct PageError(ApiError);

impl From<ApiError> for PageError {
    fn from(err: ApiError) -> Self {
        PageError(err)
    }
}

impl From<sqlx::Error> for PageError {
    fn from(err: sqlx::Error) -> Self {
        PageError(err.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let error = match self.0 {
            ApiError::Client {
                status, message, ..
            } => ErrorPage {
                status,
                title: match status {
                    StatusCode::FORBIDDEN => "Not allowed",
                    StatusCode::NOT_FOUND => "Not found",
                    _ => "Cannot do that",
                },
                message,
            },
            ApiError::RateLimited { message, .. } => ErrorPage {
                status: StatusCode::TOO_MANY_REQUESTS,
                title: "Over the quota",
                message,
            },
            internal => return internal.into_response(),
        };
        // Without the person (see `keep_header`, which adds them).
        let mut response = message_page(error.status, error.title, &error.message, false);
        response.extensions_mut().insert(error);
        response
    }
}

fn see_other(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(LOCATION, to.to_owned())]).into_response()
}

/// A form body as ordered pairs: names may repeat (the env rows).
fn form_pairs(body: &Bytes) -> Vec<(String, String)> {
    form_urlencoded::parse(body).into_owned().collect()
}

fn field<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

// ---- sign-in -------------------------------------------------------------

#[derive(Template)]
#[template(path = "page/login.html")]
struct LoginPage {
    chrome: Chrome,
    siwe: bool,
    domain: String,
    proxy_header: Option<String>,
}

/// `GET /login`
pub async fn login(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let (chrome, cookie) = chrome(&state, &headers, None);
    let page = LoginPage {
        chrome,
        siwe: state.page_auth.siwe_enabled(),
        domain: state.page_auth.domain().unwrap_or_default().to_owned(),
        proxy_header: state.page_auth.proxy_header().map(|h| h.to_string()),
    };
    html(page.render(), StatusCode::OK, cookie)
}

/// `POST /logout`; with `everywhere`, every session of the person ends.
pub async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, PageError> {
    let pairs = form_pairs(&body);
    check_csrf(&state.page_auth, &headers, field(&pairs, CSRF_FIELD))?;
    let everywhere = field(&pairs, "everywhere").is_some();
    let forget = sign_out(&state, &headers, everywhere).await?;
    let mut response = see_other("/login");
    response.headers_mut().append(SET_COOKIE, forget);
    Ok(response)
}

// ---- the list -------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    status: String,
    #[serde(default)]
    app: String,
    #[serde(default)]
    source: String,
}

impl ListQuery {
    fn filter(&self, reach: Reach) -> Result<RequestFilter, ApiError> {
        let status = match self.status.as_str() {
            "" => None,
            s => Some(s.parse::<Status>().map_err(|_| {
                ApiError::bad_request("invalid_status", format!("there is no status {s}"))
            })?),
        };
        let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        Ok(RequestFilter {
            status,
            app_id: some(&self.app),
            source: some(&self.source),
            reach,
        })
    }

    fn query_string(&self) -> String {
        let mut out = form_urlencoded::Serializer::new(String::new());
        for (name, value) in [
            ("status", &self.status),
            ("app", &self.app),
            ("source", &self.source),
        ] {
            if !value.is_empty() {
                out.append_pair(name, value);
            }
        }
        let query = out.finish();
        if query.is_empty() {
            query
        } else {
            format!("?{query}")
        }
    }
}

/// A status in the list's filter: its name, and its words.
struct StatusOption {
    value: &'static str,
    label: &'static str,
}

#[derive(Template)]
#[template(path = "page/replicas.html")]
struct ReplicasPage {
    chrome: Chrome,
    rows: Vec<RowView>,
    filtered: bool,
    statuses: Vec<StatusOption>,
    apps: Vec<String>,
    sources: Vec<String>,
    filter_status: String,
    filter_app: String,
    filter_source: String,
    query: String,
}

#[derive(Template)]
#[template(path = "page/rows.html")]
struct RowsPartial {
    rows: Vec<RowView>,
    filtered: bool,
}

/// What a person sees: everything, unless a `web:` scope narrows it.
fn reach_of(state: &AppState, user: &PageUser) -> Reach {
    state.access.reach(&user.actor())
}

async fn rows(
    state: &AppState,
    user: &PageUser,
    query: &ListQuery,
) -> Result<Vec<RowView>, PageError> {
    let reach = reach_of(state, user);
    let requests = state
        .store
        .filtered_requests(&query.filter(reach.clone())?, LIST_LIMIT)
        .await?;
    let proposals = proposals_of(state, &reach, &requests).await?;
    let (people, now) = (people(state, user), state.clock.now());
    Ok(requests
        .iter()
        .map(|r| RowView::new(&views::replica(r, &proposals), &people, now))
        .collect())
}

/// `GET /replicas`: newest first, filtered by status, app and source.
pub async fn list(
    State(state): State<AppState>,
    user: PageUser,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Result<Response, PageError> {
    let rows = rows(&state, &user, &query).await?;
    let (apps, sources) = state.store.request_facets(&reach_of(&state, &user)).await?;
    let (chrome, cookie) = chrome(&state, &headers, Some(&user));
    let page = ReplicasPage {
        chrome,
        rows,
        filtered: !query.query_string().is_empty(),
        statuses: Status::ALL
            .iter()
            .map(|s| StatusOption {
                value: s.as_str(),
                label: status_words(*s).label,
            })
            .collect(),
        apps,
        sources,
        query: query.query_string(),
        filter_status: query.status,
        filter_app: query.app,
        filter_source: query.source,
    };
    Ok(html(page.render(), StatusCode::OK, cookie))
}

/// `GET /replicas/rows`: the list's rows alone, which the page polls.
pub async fn rows_partial(
    State(state): State<AppState>,
    user: PageUser,
    Query(query): Query<ListQuery>,
) -> Result<Response, PageError> {
    let page = RowsPartial {
        rows: rows(&state, &user, &query).await?,
        filtered: !query.query_string().is_empty(),
    };
    Ok(html(page.render(), StatusCode::OK, None))
}

// ---- one request -------------------------------------------------------------

#[derive(Template)]
#[template(path = "page/detail.html")]
struct DetailPage {
    chrome: Chrome,
    d: DetailView,
}

#[derive(Template)]
#[template(path = "page/live.html")]
struct LivePartial {
    chrome: Chrome,
    d: DetailView,
}

async fn detail_view(state: &AppState, user: &PageUser, id: &str) -> Result<DetailView, PageError> {
    let reach = reach_of(state, user);
    Ok(DetailView::new(
        detail_of(state, &reach, parse_id(id)?).await?,
        &people(state, user),
        state.clock.now(),
    ))
}

/// `GET /replicas/{id}`: status, timeline, error, proposal, cancel.
pub async fn detail(
    State(state): State<AppState>,
    user: PageUser,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let d = detail_view(&state, &user, &id).await?;
    let (chrome, cookie) = chrome(&state, &headers, Some(&user));
    Ok(html(
        DetailPage { chrome, d }.render(),
        StatusCode::OK,
        cookie,
    ))
}

/// `GET /replicas/{id}/live`: the detail's changing part, which the page polls.
pub async fn live_partial(
    State(state): State<AppState>,
    user: PageUser,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let d = detail_view(&state, &user, &id).await?;
    // The cancel form lives in the changing part: it shows only while the
    // request can be cancelled.
    let (chrome, cookie) = chrome(&state, &headers, Some(&user));
    Ok(html(
        LivePartial { chrome, d }.render(),
        StatusCode::OK,
        cookie,
    ))
}

/// `POST /replicas/{id}/cancel`: operators only, as the API's cancel.
pub async fn cancel(
    State(state): State<AppState>,
    user: PageUser,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, PageError> {
    let pairs = form_pairs(&body);
    check_csrf(&state.page_auth, &headers, field(&pairs, CSRF_FIELD))?;
    user.require_operator()?;
    let reach = reach_of(&state, &user);
    let request = cancel_as(&state, &user.actor(), &reach, parse_id(&id)?).await?;
    Ok(see_other(&format!("/replicas/{}", request.id)))
}

// ---- the queue form -------------------------------------------------------------

/// What the person typed, shown again when the bridge refuses it.
#[derive(Default)]
struct FormValues {
    source: String,
    node: String,
    count: String,
    env: String,
    note: String,
}

/// A refusal of the form, and the field it is about (marked
/// `aria-invalid` and described by the message).
struct FormError {
    status: StatusCode,
    message: String,
    field: Option<&'static str>,
}

#[derive(Template)]
#[template(path = "page/queue.html")]
struct QueuePage {
    chrome: Chrome,
    error: Option<FormError>,
    facts: Arc<FormFacts>,
    nodes: Vec<NodeRow>,
    values: FormValues,
    idempotency_key: String,
}

impl QueuePage {
    fn invalid(&self, field: &str) -> bool {
        self.error.as_ref().and_then(|e| e.field) == Some(field)
    }

    fn some_refused(&self) -> bool {
        self.facts.sources.iter().any(|s| s.refusal.is_some())
    }
}

/// A node of the form's menu, with what a replica of each source needs
/// there (the script shows the chosen source's), and of the source shown.
struct NodeRow {
    choice: NodeChoice,
    needs: Vec<String>,
    shown_need: String,
}

async fn queue_page(
    state: &AppState,
    user: &PageUser,
    headers: &HeaderMap,
    values: FormValues,
    error: Option<FormError>,
    idempotency_key: String,
) -> Response {
    let facts = form_facts(state).await;
    // The node menu shows the needs of the chosen source, else of the
    // first one offered: the one the browser selects.
    let shown_source = facts
        .sources
        .iter()
        .position(|s| s.value == values.source && s.refusal.is_none())
        .or_else(|| facts.sources.iter().position(|s| s.refusal.is_none()));
    let nodes = facts
        .nodes
        .iter()
        .enumerate()
        .map(|(i, choice)| NodeRow {
            choice: choice.clone(),
            needs: facts.sources.iter().map(|s| s.need(i).to_owned()).collect(),
            shown_need: shown_source
                .map(|s| facts.sources[s].need(i).to_owned())
                .unwrap_or_default(),
        })
        .collect();
    let (chrome, cookie) = chrome(state, headers, Some(user));
    let status = error.as_ref().map_or(StatusCode::OK, |e| e.status);
    let error = error.map(|e| FormError {
        message: page_words(&redact(&e.message)),
        ..e
    });
    let page = QueuePage {
        chrome,
        error,
        facts,
        nodes,
        values: FormValues {
            count: if values.count.is_empty() {
                "1".to_owned()
            } else {
                values.count
            },
            ..values
        },
        idempotency_key,
    };
    html(page.render(), status, cookie)
}

/// `GET /replicas/new`: operators only.
pub async fn new_form(
    State(state): State<AppState>,
    user: PageUser,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    user.require_operator()?;
    let key = uuid::Uuid::new_v4().to_string();
    Ok(queue_page(&state, &user, &headers, FormValues::default(), None, key).await)
}

/// The form as the JSON API's body: env from the .env text, then the rows.
/// A refusal names its field.
fn order_json(pairs: &[(String, String)]) -> Result<Value, (&'static str, String)> {
    let mut env = BTreeMap::new();
    let text = field(pairs, "env").unwrap_or_default();
    for item in dotenvy::from_read_iter(text.as_bytes()) {
        let (name, value) =
            item.map_err(|err| ("env", format!("the .env text does not parse: {err}")))?;
        env.insert(name, value);
    }
    let names = pairs
        .iter()
        .filter(|(n, _)| n == "env_name")
        .map(|(_, v)| v);
    let values = pairs
        .iter()
        .filter(|(n, _)| n == "env_value")
        .map(|(_, v)| v);
    for (name, value) in names.zip(values) {
        if !name.trim().is_empty() {
            env.insert(name.trim().to_owned(), value.clone());
        }
    }
    let mut order = Map::new();
    order.insert(
        "source".into(),
        json!(field(pairs, "source").unwrap_or_default().trim()),
    );
    if let Some(node) = field(pairs, "node").filter(|n| !n.is_empty()) {
        order.insert("node".into(), json!(node));
    }
    let count = field(pairs, "count").unwrap_or("1").trim();
    let count: u64 = count
        .parse()
        .map_err(|_| ("count", format!("Count: {count} is not a whole number")))?;
    order.insert("count".into(), json!(count));
    if !env.is_empty() {
        order.insert("env".into(), json!(env));
    }
    if let Some(note) = field(pairs, "note")
        .map(str::trim)
        .filter(|n| !n.is_empty())
    {
        order.insert("note".into(), json!(note));
    }
    Ok(Value::Object(order))
}

/// `POST /replicas`: queues through intake as the signed-in operator, then
/// shows the request (or the list, for several).
pub async fn queue(
    State(state): State<AppState>,
    user: PageUser,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, PageError> {
    let pairs = form_pairs(&body);
    check_csrf(&state.page_auth, &headers, field(&pairs, CSRF_FIELD))?;
    user.require_operator()?;
    let values = FormValues {
        source: field(&pairs, "source").unwrap_or_default().to_owned(),
        node: field(&pairs, "node").unwrap_or_default().to_owned(),
        count: field(&pairs, "count").unwrap_or_default().to_owned(),
        env: field(&pairs, "env").unwrap_or_default().to_owned(),
        note: field(&pairs, "note").unwrap_or_default().to_owned(),
    };
    // The page makes it (a UUID); anything else, as the API's header rule
    // would refuse it, is no key (Postgres takes no NUL in text).
    let key = field(&pairs, "idempotency_key")
        .filter(|k| !k.is_empty() && k.len() <= 64 && k.bytes().all(|b| b.is_ascii_graphic()))
        .map(|k| format!("page-{k}"));
    let retry_key = uuid::Uuid::new_v4().to_string();
    let refuse = |status, field, message| FormError {
        status,
        message,
        field,
    };
    let order = match order_json(&pairs) {
        Ok(order) => order,
        Err((name, message)) => {
            let error = refuse(StatusCode::UNPROCESSABLE_ENTITY, Some(name), message);
            return Ok(queue_page(&state, &user, &headers, values, Some(error), retry_key).await);
        }
    };
    // A source the form marks as not replicable is refused with its reason
    // (the menu does not offer it; a hand-made form could).
    if let Some(reason) = form_facts(&state)
        .await
        .source(&values.source)
        .and_then(|s| s.refusal.clone())
    {
        let message = format!("{} cannot be replicated: {reason}", values.source);
        let error = refuse(StatusCode::UNPROCESSABLE_ENTITY, Some("source"), message);
        return Ok(queue_page(&state, &user, &headers, values, Some(error), retry_key).await);
    }
    let body = serde_json::to_vec(&order).map_err(ApiError::from)?;
    match intake::queue(&state, user.actor(), key, &body).await {
        Ok(answer) => {
            let ids: Vec<&str> = answer.body["replicas"]
                .as_array()
                .map(|r| r.iter().filter_map(|r| r["id"].as_str()).collect())
                .unwrap_or_default();
            Ok(match ids.as_slice() {
                [one] => see_other(&format!("/replicas/{one}")),
                _ => see_other("/replicas"),
            })
        }
        Err(ApiError::Client {
            status,
            code,
            message,
        }) => {
            let error = refuse(status, field_of(code, &body), message);
            Ok(queue_page(&state, &user, &headers, values, Some(error), retry_key).await)
        }
        Err(ApiError::RateLimited { message, .. }) => {
            let error = refuse(StatusCode::TOO_MANY_REQUESTS, Some("count"), message);
            Ok(queue_page(&state, &user, &headers, values, Some(error), retry_key).await)
        }
        Err(err) => Err(err.into()),
    }
}

/// The form field an intake refusal is about, if one is.
fn field_of(code: &str, body: &[u8]) -> Option<&'static str> {
    match code {
        "unknown_source" | "ambiguous_source" => Some("source"),
        "unknown_node" | "ambiguous_node" => Some("node"),
        "env_not_allowed" | "env_key_unverified" => Some("env"),
        "invalid_field" => match ReplicaOrder::from_json(body) {
            Err(InvalidOrder::Field { field, .. }) => ["source", "node", "count", "env", "note"]
                .into_iter()
                .find(|f| *f == field),
            _ => None,
        },
        _ => None,
    }
}

/// The page's script: live updates, the wallet sign-in, the env checks.
pub async fn script() -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/javascript; charset=utf-8",
        )],
        include_str!("../../../static/app.js"),
    )
}

// ---- proposals -------------------------------------------------------------

#[derive(Template)]
#[template(path = "page/proposals.html")]
struct ProposalsPage {
    chrome: Chrome,
    proposals: Vec<ProposalPage>,
}

#[derive(Template)]
#[template(path = "page/proposal_list.html")]
struct ProposalsPartial {
    proposals: Vec<ProposalPage>,
}

/// The open proposals `user` sees, with people named for them.
async fn proposal_pages(state: &AppState, user: &PageUser) -> Result<Vec<ProposalPage>, PageError> {
    let people = people(state, user);
    Ok(open_proposals(&state.store, &reach_of(state, user))
        .await
        .map_err(ApiError::from)?
        .into_iter()
        .map(|p| ProposalPage::new(p, &people))
        .collect())
}

/// `GET /proposals`: the open Safe transactions, as the signers see them.
pub async fn proposals(
    State(state): State<AppState>,
    user: PageUser,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let proposals = proposal_pages(&state, &user).await?;
    let (chrome, cookie) = chrome(&state, &headers, Some(&user));
    Ok(html(
        ProposalsPage { chrome, proposals }.render(),
        StatusCode::OK,
        cookie,
    ))
}

/// `GET /proposals/live`: the list alone, which the page polls.
pub async fn proposals_partial(
    State(state): State<AppState>,
    user: PageUser,
) -> Result<Response, PageError> {
    let proposals = proposal_pages(&state, &user).await?;
    Ok(html(
        ProposalsPartial { proposals }.render(),
        StatusCode::OK,
        None,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::web::pages::ui_models::RowView;

    fn detail(extra_replicas: Vec<String>) -> DetailView {
        let words = status_words(Status::Provisioning);
        let now = chrono::Utc::now();
        DetailView {
            row: RowView {
                id: "0190a1b2-0000-7000-8000-000000000001".into(),
                short_id: "00000001".into(),
                status: "provisioning".into(),
                status_label: words.label,
                next_step: words.next_step,
                error: None,
                source: "web-prod".into(),
                node: "prod-2".into(),
                app: "2e2e".into(),
                approval: "-".into(),
                signed: None,
                created_by: People::new(&Default::default(), None).actor("api:ops"),
                created_at: crate::web::pages::ui_people::Moment::new(now, now),
            },
            compose_hash: None,
            env_names: String::new(),
            note: None,
            vm_uuid: Some("replica-1".into()),
            extra_replicas,
            dashboard_link: None,
            error: None,
            proposal: None,
            events: Vec::new(),
            cancellable: false,
        }
    }

    fn operator() -> Chrome {
        Chrome {
            csrf: "token".into(),
            user: Some(People::new(&Default::default(), None).person("ops@example.com")),
            operator: true,
        }
    }

    #[test]
    fn the_detail_warns_of_a_second_cvm_for_one_request() {
        let page = LivePartial {
            chrome: operator(),
            d: detail(vec!["replica-2".into(), "replica-3".into()]),
        }
        .render()
        .unwrap();
        assert!(
            page.contains("More than one CVM for this request"),
            "{page}"
        );
        assert!(
            page.contains("<code>replica-2</code>, <code>replica-3</code>"),
            "{page}"
        );

        let page = LivePartial {
            chrome: operator(),
            d: detail(Vec::new()),
        }
        .render()
        .unwrap();
        assert!(!page.contains("More than one CVM"), "{page}");
    }

    #[test]
    fn cancel_is_offered_only_while_it_can_act_and_asks_first() {
        let provisioning = LivePartial {
            chrome: operator(),
            d: detail(Vec::new()),
        }
        .render()
        .unwrap();
        assert!(
            !provisioning.contains("Cancel this request"),
            "{provisioning}"
        );
        let waiting = LivePartial {
            chrome: operator(),
            d: DetailView {
                cancellable: true,
                ..detail(Vec::new())
            },
        }
        .render()
        .unwrap();
        assert!(waiting.contains("Cancel this request"), "{waiting}");
        assert!(waiting.contains("data-confirm="), "{waiting}");
    }
}
