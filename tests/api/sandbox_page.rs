//! The team page and the sandbox page in a real browser: headless Chromium
//! driven over WebDriver (chromedriver) with fantoccini. The person signs in
//! with a wallet the test injects (EIP-1193: it hands `personal_sign` to the
//! test, which signs in Rust with the anvil key, so the page's CSP stays as
//! it is), queues with the form, and follows the request live while the
//! sandbox's buttons sign and execute. Screenshots go to
//! `target/screenshots/`.

use std::time::Duration;

use approval_bridge::sandbox::OWNER_NAMES;
use fantoccini::Locator;
use serde_json::{Value, json};

use crate::browser::{Browser, operator, queue_api, request_until, start_sandbox};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_signs_in_queues_and_follows_a_replica_to_done_in_the_browser() {
    let sandbox = start_sandbox().await;
    let base = sandbox.url.to_string();
    let browser = Browser::start("queue_and_follow").await;

    browser
        .sign_in_with_wallet(&base, &operator(&sandbox), sandbox.chain.chain_id())
        .await;
    assert!(
        browser.body().await.contains("operator"),
        "{}",
        browser.body().await
    );

    // Queue web-prod on prod-2 with the form: the request's page opens.
    browser.open(&format!("{base}replicas/new")).await;
    let form = browser.client.find(Locator::Css("#source")).await.unwrap();
    form.select_by_value("web-prod").await.unwrap();
    let node = browser.client.find(Locator::Css("#node")).await.unwrap();
    node.select_by_value("prod-2").await.unwrap();
    browser
        .client
        .find(Locator::Css("#note"))
        .await
        .unwrap()
        .send_keys("from the browser test")
        .await
        .unwrap();
    // A name outside the app's allowed_envs is refused before the form is sent.
    let env_name = browser
        .client
        .find(Locator::Css("#env-name-0"))
        .await
        .unwrap();
    env_name.send_keys("NOT_ALLOWED").await.unwrap();
    browser.click("#queue button[type=submit]").await;
    browser
        .wait_for_text(
            "#form-error",
            "Not in the app's allowed_envs: NOT_ALLOWED",
            10,
        )
        .await;
    assert!(
        browser
            .client
            .current_url()
            .await
            .unwrap()
            .path()
            .ends_with("/replicas/new")
    );
    env_name.clear().await.unwrap();
    browser.screenshot("queue-form").await;
    browser.click("#queue button[type=submit]").await;
    // The form posts, then redirects to the new request's page.
    let mut url = browser.client.current_url().await.unwrap();
    for _ in 0..300 {
        if !url.path().ends_with("/replicas/new") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        url = browser.client.current_url().await.unwrap();
    }
    let id = url.path().trim_start_matches("/replicas/").to_owned();
    assert_eq!(id.len(), 36, "{url}");

    // The detail updates by itself to awaiting_approval.
    browser.mark().await;
    browser
        .wait_for_text("#status", "Waiting for the owners", 60)
        .await;
    assert!(browser.same_page().await, "the page was reloaded");
    browser.screenshot("awaiting-approval").await;
    let timeline = browser.text(".timeline").await;
    assert!(
        timeline.contains("Queued") && timeline.contains("by you"),
        "{timeline}"
    );

    // Owner 0 signs with the sandbox's button, in a second tab.
    let detail = browser.client.window().await.unwrap();
    let tab = browser.client.new_window(true).await.unwrap();
    browser.client.switch_to_window(tab.handle).await.unwrap();
    browser.open(&format!("{base}sandbox")).await;
    browser.click("form[action$='/sign'] button").await;
    browser.wait_for_text("#proposals", "1 of 2", 20).await;
    browser.screenshot("sandbox-one-signed").await;

    // The proposals page: what it approves, for whom, and who still signs.
    let waiting = format!(
        "1 of 2 confirmations; waiting for one of {}, {}",
        OWNER_NAMES[1], OWNER_NAMES[2]
    );
    browser.open(&format!("{base}proposals")).await;
    let proposals = browser.wait_for_text("#proposals", &waiting, 60).await;
    assert!(
        proposals.contains("addDevice") && proposals.contains("web-prod"),
        "{proposals}"
    );
    assert!(proposals.contains(OWNER_NAMES[0]), "{proposals}");
    browser.screenshot("proposals").await;
    browser.open(&format!("{base}sandbox")).await;

    // Back on the request: 1 of 2, waiting for the other owners, live.
    browser
        .client
        .switch_to_window(detail.clone())
        .await
        .unwrap();
    browser.wait_for_text("#live .approval", &waiting, 60).await;
    assert!(browser.same_page().await);
    browser.screenshot("one-of-two").await;

    // Owner 1 signs and the executor executes: the request reaches done.
    let tabs = browser.client.windows().await.unwrap();
    let sandbox_tab = tabs.into_iter().find(|w| *w != detail).unwrap();
    browser.client.switch_to_window(sandbox_tab).await.unwrap();
    browser.click("form[action$='/sign'] button").await;
    browser.wait_for_text("#proposals", "2 of 2", 20).await;
    browser.click("form[action$='/execute'] button").await;
    browser.client.switch_to_window(detail).await.unwrap();
    browser.wait_for_text("#status", "Done", 120).await;
    assert!(browser.same_page().await);
    let shot = browser.screenshot("done").await;
    println!("the request, done: {}", shot.display());

    // The list shows it too, with the operator as its author.
    browser.open(&format!("{base}replicas?status=done")).await;
    let rows = browser.text("#rows").await;
    assert!(
        rows.contains(&id[id.len() - 8..]) && rows.contains("Done"),
        "{rows}"
    );
    browser.client.set_window_size(390, 844).await.unwrap();
    browser.screenshot("replicas-phone").await;

    browser.finish(sandbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_refuses_a_form_without_csrf_and_an_owner_cancelling() {
    let sandbox = start_sandbox().await;
    let base = sandbox.url.to_string();
    let http = reqwest::Client::new();
    let queued: Value = http
        .post(format!("{base}api/v1/replicas"))
        .bearer_auth(&sandbox.options.api_token)
        .json(&json!({"source": "web-prod", "node": "prod-3"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = queued["replicas"][0]["id"].as_str().unwrap().to_owned();
    let browser = Browser::start("refusals").await;

    // The sandbox's dev login, as owner 0: it reads, and may not cancel.
    browser.open(&format!("{base}sandbox")).await;
    let account = browser.client.find(Locator::Css("#account")).await.unwrap();
    account.select_by_value("owner-0").await.unwrap();
    browser
        .click("form[action='/sandbox/dev-login'] button")
        .await;
    browser.wait_for_text("header", OWNER_NAMES[0], 20).await;
    assert!(browser.text("header").await.contains("read-only"));
    browser.open(&format!("{base}replicas/{id}")).await;
    assert!(
        browser
            .client
            .find(Locator::Css("form.cancel"))
            .await
            .is_err()
    );
    // The cancel form, made by hand with this page's own CSRF token.
    browser
        .client
        .execute(
            r#"const form = document.createElement("form");
               form.method = "post"; form.action = arguments[0];
               const csrf = document.createElement("input");
               csrf.type = "hidden"; csrf.name = "csrf";
               csrf.value = document.querySelector('meta[name="csrf-token"]').content;
               form.append(csrf); document.body.append(form); form.submit();"#,
            vec![json!(format!("/replicas/{id}/cancel"))],
        )
        .await
        .unwrap();
    browser
        .wait_for_text("body", "only operators may queue and cancel", 20)
        .await;
    browser.screenshot("owner-refused").await;

    // As the operator, the cancel form without its CSRF token is refused.
    browser.open(&format!("{base}sandbox")).await;
    let account = browser.client.find(Locator::Css("#account")).await.unwrap();
    account.select_by_value("operator").await.unwrap();
    browser
        .click("form[action='/sandbox/dev-login'] button")
        .await;
    browser.wait_for_text("header", "operator", 20).await;
    browser.open(&format!("{base}replicas/{id}")).await;
    // In one script, so no live refresh comes in between; the confirmation
    // is answered "yes" (it has its own test).
    browser
        .client
        .execute(
            "window.confirm = () => true;
             document.querySelector('form.cancel input[name=csrf]').remove();
             document.querySelector('form.cancel').requestSubmit()",
            vec![],
        )
        .await
        .unwrap();
    browser
        .wait_for_text("body", "CSRF token is missing", 20)
        .await;
    browser.screenshot("csrf-refused").await;

    // Neither changed anything.
    let request: Value = http
        .get(format!("{base}api/v1/replicas/{id}"))
        .bearer_auth(&sandbox.options.api_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(request["status"], "cancelled");
    let actors: Vec<&str> = request["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["actor"].as_str())
        .collect();
    assert!(actors.iter().all(|a| !a.starts_with("web:")), "{actors:?}");

    // With its token, the operator's cancel goes through, recorded as theirs.
    browser.open(&format!("{base}replicas/{id}")).await;
    browser.click("form.cancel button").await;
    browser.client.accept_alert().await.unwrap();
    browser.wait_for_text("#status", "Cancelled", 20).await;
    let timeline = browser.text(".timeline").await;
    assert!(timeline.contains("Cancelled by you"), "{timeline}");

    browser.finish(sandbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_updates_keep_focus_and_selection_and_cancel_asks_first() {
    let sandbox = start_sandbox().await;
    let base = sandbox.url.to_string();
    let browser = Browser::start("live_focus").await;
    browser.client.set_window_size(1366, 900).await.unwrap();
    browser.dev_login(&base, "operator").await;
    let first = queue_api(&sandbox, "prod-2").await;

    // Focus the cancel button while the request is on its way.
    browser.open(&format!("{base}replicas/{first}")).await;
    browser
        .js("window.__cancel = document.querySelector('#cancel-form button'); window.__cancel.focus();")
        .await;
    browser
        .wait_for_text("#status", "Waiting for the owners", 60)
        .await;
    assert_eq!(
        browser
            .js("return document.activeElement === window.__cancel && window.__cancel.isConnected")
            .await,
        json!(true),
        "the focus left the cancel button"
    );

    // Select the safeTxHash and focus the button; then owner 0 signs, so
    // the proposal's part of the page changes under them.
    let hash = browser
        .js("const code = document.querySelector('#live .proposal code.hash');
             const range = document.createRange(); range.selectNodeContents(code);
             const selection = window.getSelection(); selection.removeAllRanges(); selection.addRange(range);
             window.__hash = code; window.__cancel.focus();
             return code.textContent;")
        .await;
    let hash = hash.as_str().unwrap().to_owned();
    assert!(hash.starts_with("0x") && hash.len() == 66, "{hash}");
    let signed = reqwest::Client::new()
        .post(format!("{base}sandbox/safe/{hash}/sign"))
        .json(&json!({"owner": 0}))
        .send()
        .await
        .unwrap();
    assert!(signed.status().is_success());
    browser
        .wait_for_text("#live .approval", "1 of 2 confirmations", 30)
        .await;
    // And nothing more changes for several refreshes.
    browser.wait_for_refreshes(3).await;
    let kept = browser
        .js("return [document.activeElement === window.__cancel, window.getSelection().toString(), window.__hash.isConnected]")
        .await;
    assert_eq!(kept, json!([true, hash, true]), "focus or selection lost");
    // The change was read out to screen readers.
    let announced = browser
        .js("return document.getElementById('announce').textContent")
        .await;
    assert!(
        announced.as_str().unwrap().contains("1 of 2 confirmations"),
        "{announced}"
    );

    // A second batch stacks behind the first: the queue shows both, by nonce.
    let second = queue_api(&sandbox, "prod-3").await;
    let behind = request_until(&sandbox, &second, |r| r["status"] == "awaiting_approval").await;
    let behind_hash = behind["proposal"]["safe_tx_hash"]
        .as_str()
        .unwrap()
        .to_owned();
    let nonce = behind["proposal"]["nonce"].as_i64().unwrap() - 1;
    browser.open(&format!("{base}proposals")).await;
    let queue = browser
        .wait_for_text("#proposals", &format!("blocked by nonce {nonce}"), 60)
        .await;
    assert!(queue.contains("next; needs 1 more signature"), "{queue}");
    assert!(
        queue.find(&hash).unwrap() < queue.find(&behind_hash).unwrap(),
        "lowest nonce first: {queue}"
    );
    assert!(
        queue.contains("Checked: device of node prod-2, named by the order"),
        "{queue}"
    );
    let shot = browser.screenshot("proposal-queue").await;
    println!("the queue: {}", shot.display());
    browser.open(&format!("{base}replicas")).await;
    browser.screenshot("replicas-list").await;

    // The sandbox says, per owner, what Safe{Wallet} offers, and why a
    // proposal cannot execute yet, in words.
    browser.open(&format!("{base}sandbox")).await;
    let row = format!("tr[data-id='{behind_hash}']");
    let text = browser
        .wait_for_text(&row, &format!("nonce {nonce} must go first"), 20)
        .await;
    assert!(text.contains("Confirm as 0"), "{text}");
    assert!(
        browser
            .text(&format!("tr[data-id='{hash}']"))
            .await
            .contains("not enough signatures: 1 of 2"),
    );
    browser
        .click(&format!("{row} form[action$='/execute'] button"))
        .await;
    let notice = browser.wait_for_text("#notice", "Not executed", 20).await;
    assert!(
        notice.contains(&format!("nonce {nonce} must go first")),
        "{notice}"
    );
    assert!(
        !browser.body().await.contains("\"error\""),
        "raw JSON on the page"
    );
    browser.screenshot("sandbox-queue").await;

    // Cancel asks first: "no" keeps the request, "yes" cancels it, and the
    // button goes with the state that allowed it.
    browser.open(&format!("{base}replicas/{first}")).await;
    browser.click("#cancel-form button").await;
    let question = browser.client.get_alert_text().await.unwrap();
    assert!(question.starts_with("Cancel this request?"), "{question}");
    browser.client.dismiss_alert().await.unwrap();
    browser.wait_for_refreshes(1).await;
    let request = request_until(&sandbox, &first, |_| true).await;
    assert_eq!(request["status"], "awaiting_approval");
    browser.click("#cancel-form button").await;
    browser.client.accept_alert().await.unwrap();
    browser.wait_for_text("#status", "Cancelled", 20).await;
    assert!(
        browser
            .client
            .find(Locator::Css("#cancel-form"))
            .await
            .is_err(),
        "cancel is offered on a cancelled request"
    );

    // On a phone.
    browser.open(&format!("{base}proposals")).await;
    browser.client.set_window_size(390, 844).await.unwrap();
    browser
        .wait_for_text("#proposals", "blocked by nonce", 30)
        .await;
    browser.screenshot("proposal-queue-phone").await;

    browser.finish(sandbox).await;
}
