//! `approval-bridge bench`: the figures of the performance table, measured
//! from outside on this binary's `serve` against the sandbox's world, each
//! beside its target, in one run. Prints a table and writes JSON.
//!
//! The world (anvil with 1 s blocks and 2 confirmations, the simulators)
//! runs in this process; `serve` runs as a child process of this binary,
//! with its own database, and reaches the chain's JSON-RPC through a
//! counting proxy (its `newHeads` come straight from anvil's WebSocket).
//! Times come from the bridge's own events (its database clock) and from
//! this process's `newHeads` subscription (when each block arrived).

mod figures;
mod rpc_count;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::providers::{Provider, ProviderBuilder, WsConnect};
use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use reqwest::Url;
use serde_json::{Value, json};

use crate::sandbox::{Sandbox, SandboxOptions};
use figures::{Figure, Pace, Table};

/// The settings of one run.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Nodes with free slots in the world (`prod-1` to `prod-N`).
    #[arg(long, default_value_t = 160, value_parser = clap::value_parser!(u32).range(140..=1000))]
    pub nodes: u32,
    /// Free CVM slots on each node: room for the whole intake burst on one.
    #[arg(long, default_value_t = 4_096, value_parser = clap::value_parser!(u32).range(32..=100_000))]
    pub slots: u32,
    /// Single-replica rounds: each is queued, proposed, signed, executed and
    /// committed, and gives one sample of the commit delay.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(1..=30))]
    pub rounds: u32,
    /// Intake requests sent by 50 clients (and bare INSERTs to compare).
    #[arg(long, default_value_t = 2_000)]
    pub burst: u32,
    /// Single-replica rounds with `serve` polling, at 1 s blocks.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=30))]
    pub polling_rounds: u32,
    /// Single-replica rounds with `serve` polling, at 12 s blocks (each
    /// takes about 40 s).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=10))]
    pub slow_rounds: u32,
    /// Open proposals while the RPC calls per block are counted.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub open_proposals: u32,
    /// Postgres server for the bridge's database `approval_bridge_bench`
    /// (dropped and created afresh).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub postgres_url: String,
    /// Where to write the figures as JSON.
    #[arg(long, default_value = "bench.json")]
    pub json: std::path::PathBuf,
}

const TOKEN: &str = "sandbox-token";
const SOURCE: &str = "web-prod";
const CONFIRMATIONS: u64 = 2;
/// The simulator's boot time of a replica: when it starts running after its commit.
const BOOT: Duration = Duration::from_secs(3);
/// Concurrent intake clients.
const CLIENTS: u32 = 50;
/// How much slower Phala answers while the intake's p99 is compared.
const SLOW_PHALA: Duration = Duration::from_millis(500);
/// Intake POSTs at each Phala speed.
const SLOW_BURST: u32 = 400;
/// How long `serve` reuses a Phala lookup (its default, set explicitly).
const LOOKUP_CACHE: Duration = Duration::from_secs(30);
/// Open proposals at which the planner's passes are measured.
const PASS_LEVELS: [u32; 3] = [1, 10, 100];
/// How long the planner's passes are watched at each level: about fifteen
/// passes (it polls every second in the sandbox), five of them reading
/// confirmations.
const PASS_WINDOW: Duration = Duration::from_secs(15);

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let sandbox = Sandbox::start(SandboxOptions {
        port: 0,
        world_only: true,
        nodes: args.nodes,
        slots: args.slots,
        batch_window_secs: 1,
        confirmations: CONFIRMATIONS,
        boot_delay: BOOT,
        ..SandboxOptions::default()
    })
    .await?;
    let heads = Heads::follow(sandbox.chain.ws_url()).await?;
    let proxy = rpc_count::RpcCounter::start(sandbox.chain.rpc_url()).await?;
    let database_url = fresh_database(&args.postgres_url).await?;
    let mut serve = Serve::start(&sandbox, &proxy.url, &database_url, Follow::WebSocket).await?;
    let bench = Bench {
        http: reqwest::Client::new(),
        bridge: serve.url.clone(),
        controls: sandbox.url.clone(),
        sandbox: &sandbox,
        heads: heads.clone(),
        proxy: &proxy,
        database_url: database_url.clone(),
    };
    let mut table = Table::default();
    let mut outcome = bench.measure(&args, &mut table).await.map(Some);
    if let Ok(Some(next_node)) = outcome {
        // 1 and 3 without the WebSocket: `serve` again, on the same database.
        serve.stop().await;
        outcome = match Serve::start(&sandbox, &proxy.url, &database_url, Follow::Polling).await {
            Ok(polling) => {
                serve = polling;
                match bench.polling(&args, next_node, &mut table).await {
                    Ok(next_node) => bench
                        .planner_levels(&args, next_node, &mut table)
                        .await
                        .map(|()| None),
                    Err(err) => Err(err),
                }
            }
            Err(err) => Err(err),
        };
    }
    serve.stop().await;
    let stopped = sandbox.stop().await;
    outcome?;
    stopped?;

    println!("{}", table.render());
    let json = serde_json::to_string_pretty(&table.json(&args))?;
    std::fs::write(&args.json, json + "\n")
        .with_context(|| format!("writing {}", args.json.display()))?;
    eprintln!("figures written to {}", args.json.display());
    Ok(())
}

struct Bench<'a> {
    http: reqwest::Client,
    bridge: Url,
    controls: Url,
    sandbox: &'a Sandbox,
    heads: Heads,
    proxy: &'a rpc_count::RpcCounter,
    database_url: String,
}

/// One replica's way from execution to done, as the bridge's events tell it.
#[derive(Debug, Clone)]
struct Trip {
    execution_block: u64,
    gas_estimate: Option<u64>,
    gas_used: u64,
    /// When the commit call came back (committing → provisioning).
    committed_at: DateTime<Utc>,
    done_at: DateTime<Utc>,
}

impl Bench<'_> {
    /// Every figure with `newHeads`; the first node it left unused.
    async fn measure(&self, args: &BenchArgs, table: &mut Table) -> anyhow::Result<u32> {
        let block = Duration::from_secs(self.sandbox.options.block_time.max(1));
        let mut nodes = 3..=args.nodes; // prod-1 and prod-2 already run the sources

        // 1, 2, 7: single replicas, one proposal each.
        eprintln!("bench: {} single-replica rounds", args.rounds);
        let mut commit_delays = Vec::new();
        let mut to_done = Vec::new();
        let mut after_running = Vec::new();
        let mut gas = Vec::new();
        for _ in 0..args.rounds {
            let node = nodes.next().context("not enough nodes: raise --nodes")?;
            let trip = self.single_round(node).await?;
            commit_delays.push(self.commit_delay(&trip, block)?);
            let executed = self.heads.arrival(trip.execution_block)?;
            to_done.push(seconds(trip.done_at - executed));
            after_running.push(seconds(
                trip.done_at - (trip.committed_at + chrono_of(BOOT)),
            ));
            if let Some(estimate) = trip.gas_estimate {
                gas.push((estimate, trip.gas_used));
            }
        }
        table.push(Figure::commit_delay(Pace::NewHeads, &commit_delays));
        table.push(Figure::execution_to_done(&to_done, &after_running));

        // 5: 24 replicas of one source over 7 new nodes, one Safe transaction.
        eprintln!("bench: 24 batched replicas");
        let batch_nodes: Vec<u32> = nodes.by_ref().take(7).collect();
        anyhow::ensure!(batch_nodes.len() == 7, "not enough nodes: raise --nodes");
        let (batch, batch_gas) = self.batch_round(&batch_nodes).await?;
        table.push(batch);
        gas.extend(batch_gas);
        table.push(Figure::gas(&gas));

        // 4 and 6: an intake burst (of another source, so that its queue
        // does not wait on web-prod's lock), then a proposal executed while
        // the workers digest it.
        let node = nodes.next().context("not enough nodes: raise --nodes")?;
        let (id, hash) = self.proposed(node).await?;
        eprintln!("bench: intake burst of {}", args.burst);
        table.push(self.intake(args.burst).await?);
        let loaded = self.executed_and_done(&id, &hash).await?;
        let unloaded = figures::quantile(&commit_delays, 0.5);
        table.push(Figure::under_load(
            self.commit_delay(&loaded, block)?,
            unloaded,
        ));

        // 4, second half: the intake's p99 with a slow Phala.
        eprintln!(
            "bench: intake with Phala {} ms slower",
            SLOW_PHALA.as_millis()
        );
        table.push(self.intake_with_slow_phala().await?);

        // 3: RPC calls per new block with open proposals (left unexecuted:
        // last), once the intake's requests are done: they pass through the
        // planner too.
        self.wait_for_backlog(Duration::from_secs(600)).await?;
        eprintln!("bench: RPC calls per block");
        let mut per_block = Vec::new();
        for open in [1, args.open_proposals] {
            self.open_up_to(open, &mut nodes).await?;
            per_block.push((open, self.rpc_per_block(10, Duration::from_secs(1)).await?));
        }
        table.push(Figure::rpc_per_block(Pace::NewHeads, &per_block));
        Ok(nodes.next().unwrap_or(args.nodes + 1))
    }

    /// 8: the planner's passes with 1, 10 and 100 open proposals, on nodes
    /// from `first_node` on; last, as they are left open.
    async fn planner_levels(
        &self,
        args: &BenchArgs,
        first_node: u32,
        table: &mut Table,
    ) -> anyhow::Result<()> {
        let mut nodes = first_node..=args.nodes;
        self.wait_for_backlog(Duration::from_secs(600)).await?;
        eprintln!("bench: planner passes");
        let mut passes = Vec::new();
        for open in PASS_LEVELS {
            self.open_up_to(open, &mut nodes).await?;
            passes.push((open, self.planner_passes(PASS_WINDOW).await?));
        }
        table.push(Figure::planner_passes(&passes));
        Ok(())
    }

    /// Queues single replicas, one proposal each, until `open` are open.
    async fn open_up_to(
        &self,
        open: u32,
        nodes: &mut impl Iterator<Item = u32>,
    ) -> anyhow::Result<()> {
        while self.open_proposals().await?.len() < open as usize {
            let node = nodes.next().context("not enough nodes: raise --nodes")?;
            let id = self.queue(node).await?;
            self.wait_status(&id, "awaiting_approval", Duration::from_secs(60))
                .await?;
        }
        Ok(())
    }

    /// Waits (at most `limit`) until no request is in flight but those
    /// awaiting approval, by `serve`'s queue depth on `/metrics`.
    async fn wait_for_backlog(&self, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let page = self
                .http
                .get(self.bridge.join("metrics")?)
                .send()
                .await?
                .text()
                .await?;
            let busy: f64 = page
                .lines()
                .filter(|l| l.starts_with(crate::metrics::QUEUE_DEPTH))
                .filter(|l| !l.contains("awaiting_approval"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            if busy == 0.0 {
                return Ok(());
            }
            anyhow::ensure!(
                started.elapsed() < limit,
                "{busy} requests still in flight after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The planner's passes over `window`, with nothing but open proposals
    /// to look after: how many there were and how long they took (the
    /// bridge's own histogram on `/metrics`), and how many calls the Safe
    /// Transaction Service received meanwhile (counted at the simulator).
    async fn planner_passes(&self, window: Duration) -> anyhow::Result<figures::Passes> {
        let job = format!(
            "planner:{}:{:#x}",
            self.sandbox.chain.chain_id(),
            self.sandbox.safe
        );
        let (count, sum) = self.pass_histogram(&job).await?;
        let calls = self.sandbox.safe_service.calls();
        tokio::time::sleep(window).await;
        let (count_after, sum_after) = self.pass_histogram(&job).await?;
        let calls_after = self.sandbox.safe_service.calls();
        Ok(figures::Passes {
            passes: count_after - count,
            seconds: sum_after - sum,
            calls: calls_after - calls,
        })
    }

    /// The count and the sum of the planner `job`'s pass histogram.
    async fn pass_histogram(&self, job: &str) -> anyhow::Result<(u64, f64)> {
        let page = self
            .http
            .get(self.bridge.join("metrics")?)
            .send()
            .await?
            .text()
            .await?;
        let series = |suffix: &str| -> anyhow::Result<f64> {
            let name = format!("{}_{suffix}{{", crate::metrics::PLANNER_PASS_SECONDS);
            let label = format!("planner=\"{job}\"");
            let line = page
                .lines()
                .find(|l| l.starts_with(&name) && l.contains(&label))
                .with_context(|| format!("no {name}{label}}} on /metrics"))?;
            let value = line.rsplit(' ').next().unwrap_or_default();
            value.parse().with_context(|| format!("/metrics: {line}"))
        };
        Ok((series("count")? as u64, series("sum")?))
    }

    /// Figures 1 and 3 for a `serve` without the WebSocket, at 1 s blocks
    /// and then at 12 s blocks, on nodes from `first_node` on. The calls are
    /// counted while the proposals [`Self::measure`] left open are open;
    /// then they are executed, so that the single rounds' own proposals can
    /// be (a Safe executes its nonces in order).
    async fn polling(
        &self,
        args: &BenchArgs,
        first_node: u32,
        table: &mut Table,
    ) -> anyhow::Result<u32> {
        let mut nodes = first_node..=args.nodes;
        let open = self.open_proposals().await?;
        let count = open.len() as u32;
        eprintln!("bench: polling, 1 s blocks: RPC calls");
        // Let the follower learn the block time first.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let fast = self.rpc_per_block(15, Duration::from_secs(1)).await?;
        eprintln!("bench: polling, 12 s blocks: RPC calls");
        self.set_block_time(12).await?;
        // Three blocks to learn the new pace, five to count.
        tokio::time::sleep(Duration::from_secs(36)).await;
        let slow = self.rpc_per_block(8, Duration::from_secs(12)).await;
        self.set_block_time(1).await?;
        let slow = slow?;

        eprintln!("bench: polling, 1 s blocks: single rounds");
        for (_, hash) in &open {
            self.sign_and_execute(hash).await?;
        }
        let delays = self
            .commit_rounds(&mut nodes, args.polling_rounds, Duration::from_secs(1))
            .await?;
        table.push(Figure::commit_delay(Pace::Polling, &delays));
        table.push(Figure::rpc_per_block(Pace::Polling, &[(count, fast)]));

        eprintln!("bench: polling, 12 s blocks: single rounds");
        self.set_block_time(12).await?;
        tokio::time::sleep(Duration::from_secs(24)).await;
        let delays = self
            .commit_rounds(&mut nodes, args.slow_rounds, Duration::from_secs(12))
            .await;
        self.set_block_time(1).await?;
        table.push(Figure::commit_delay(Pace::PollingSlowBlocks, &delays?));
        table.push(Figure::rpc_per_block(
            Pace::PollingSlowBlocks,
            &[(count, slow)],
        ));
        Ok(nodes.next().unwrap_or(args.nodes + 1))
    }

    /// `rounds` single replicas, one after another: each one's commit delay
    /// in blocks of `block`.
    async fn commit_rounds(
        &self,
        nodes: &mut impl Iterator<Item = u32>,
        rounds: u32,
        block: Duration,
    ) -> anyhow::Result<Vec<f64>> {
        let mut delays = Vec::new();
        for _ in 0..rounds {
            let node = nodes.next().context("not enough nodes: raise --nodes")?;
            let trip = self.single_round(node).await?;
            delays.push(self.commit_delay(&trip, block)?);
        }
        Ok(delays)
    }

    /// Mines a block every `secs` seconds from now on (anvil's interval mining).
    async fn set_block_time(&self, secs: u64) -> anyhow::Result<()> {
        let answer: Value = self
            .http
            .post(self.sandbox.chain.rpc_url())
            .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "evm_setIntervalMining", "params": [secs]}))
            .send()
            .await?
            .json()
            .await?;
        anyhow::ensure!(
            answer.get("error").is_none(),
            "evm_setIntervalMining: {answer}"
        );
        Ok(())
    }

    /// Queues one replica on `prod-{node}`, has the owners sign and execute
    /// its proposal, and waits until it is done.
    async fn single_round(&self, node: u32) -> anyhow::Result<Trip> {
        let (id, hash) = self.proposed(node).await?;
        self.executed_and_done(&id, &hash).await
    }

    /// A replica on `prod-{node}` waiting for its Safe transaction: its id
    /// and the proposal's hash.
    async fn proposed(&self, node: u32) -> anyhow::Result<(String, String)> {
        let id = self.queue(node).await?;
        let request = self
            .wait_status(&id, "awaiting_approval", Duration::from_secs(60))
            .await?;
        let hash = request["proposal"]["safe_tx_hash"]
            .as_str()
            .context("a proposal hash")?
            .to_owned();
        Ok((id, hash))
    }

    async fn executed_and_done(&self, id: &str, hash: &str) -> anyhow::Result<Trip> {
        let (block, gas_used) = self.sign_and_execute(hash).await?;
        let done = self
            .wait_status(id, "done", Duration::from_secs(180))
            .await?;
        trip(&done, block, gas_used)
    }

    /// The delay from the block that confirms the execution to the commit,
    /// in block times.
    fn commit_delay(&self, trip: &Trip, block: Duration) -> anyhow::Result<f64> {
        let confirming = self.heads.arrival(trip.execution_block + CONFIRMATIONS)?;
        Ok(seconds(trip.committed_at - confirming) / block.as_secs_f64())
    }

    async fn batch_round(&self, nodes: &[u32]) -> anyhow::Result<(Figure, Vec<(u64, u64)>)> {
        let source = self.source_uuid()?;
        let prepares_before = self.sandbox.phala.prepare_calls(&source);
        let refused_before = self.refused_commits();
        let mut ids = Vec::new();
        for i in 0..24 {
            ids.push(self.queue(nodes[i % nodes.len()]).await?);
        }
        // Under load the 24 may not all make one batch window: execute
        // every Safe transaction they went into, in nonce order.
        let mut proposals = Vec::new();
        for id in &ids {
            let request = self
                .wait_status(id, "awaiting_approval", Duration::from_secs(120))
                .await?;
            let proposal = &request["proposal"];
            let nonce = proposal["nonce"].as_u64().context("a nonce")?;
            let hash = proposal["safe_tx_hash"].as_str().context("a hash")?;
            let calls = proposal["calls"].as_array().map_or(0, Vec::len);
            proposals.push((nonce, hash.to_owned(), calls));
        }
        proposals.sort();
        proposals.dedup();
        let calls = proposals.iter().map(|(_, _, calls)| calls).sum();
        let mut gas = Vec::new();
        let mut executed = None;
        for (_, hash, _) in &proposals {
            let (block, gas_used) = self.sign_and_execute(hash).await?;
            gas.push((hash.clone(), gas_used));
            executed.get_or_insert(block);
        }
        let block = executed.context("a proposal")?;
        let mut trips = Vec::new();
        for id in &ids {
            let done = self
                .wait_status(id, "done", Duration::from_secs(300))
                .await?;
            trips.push(trip(&done, block, 0)?);
        }
        let first = trips.iter().map(|t| t.done_at).min().context("trips")?;
        let last = trips.iter().map(|t| t.done_at).max().context("trips")?;
        let executed = self.heads.arrival(block)?;
        let prepares = self.sandbox.phala.prepare_calls(&source) - prepares_before;
        let refused = self.refused_commits() - refused_before;
        // Each Safe transaction's estimate, as its requests show it.
        let mut estimates: HashMap<String, u64> = HashMap::new();
        for id in &ids {
            let request = self.get(id).await?;
            if let (Some(hash), Some(estimate)) = (
                request["proposal"]["safe_tx_hash"].as_str(),
                request["proposal"]["gas_estimate"].as_u64(),
            ) {
                estimates.insert(hash.to_owned(), estimate);
            }
        }
        let gas = gas
            .into_iter()
            .filter_map(|(hash, used)| Some((*estimates.get(&hash)?, used)))
            .collect();
        Ok((
            Figure::batch(
                prepares,
                refused,
                proposals.len(),
                calls,
                seconds(last - first),
                seconds(last - executed),
            ),
            gas,
        ))
    }

    /// 466 answers to commits so far: a superseded token.
    fn refused_commits(&self) -> usize {
        self.sandbox
            .phala
            .requests()
            .iter()
            .filter(|r| r.path.ends_with("/commit-replica") && r.status == 466)
            .count()
    }

    fn source_uuid(&self) -> anyhow::Result<String> {
        let cvm = self
            .sandbox
            .phala
            .world()
            .cvm(SOURCE)
            .context("the world has web-prod")?;
        Ok(cvm.vm_uuid.to_string())
    }

    /// `burst` intake POSTs by 50 clients, against as many bare INSERTs of
    /// one stored request by 50 connections, each with an id of its own,
    /// into a table with the same columns and indexes. Both sides start
    /// warm: each client has sent a POST, each connection is open.
    async fn intake(&self, burst: u32) -> anyhow::Result<Figure> {
        // Allowed already on its app: committed without a proposal.
        let body = json!({"source": "api-prod", "node": "prod-1", "note": "bench"});
        self.post_burst(&body, CLIENTS).await?;
        let (intake_rate, mut latencies) = self.post_burst(&body, burst).await?;

        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(CLIENTS)
            .connect(&self.database_url)
            .await?;
        let mut warm = Vec::new();
        for _ in 0..CLIENTS {
            warm.push(pool.acquire().await?);
        }
        drop(warm);
        sqlx::query("CREATE TABLE IF NOT EXISTS bench_rows (LIKE replica_requests INCLUDING ALL)")
            .execute(&pool)
            .await?;
        // Each copy without the row's replica, as intake stores a request:
        // a replica id is unique.
        let (columns, values): (String, String) = sqlx::query_as(
            "SELECT string_agg(column_name, ', ' ORDER BY ordinal_position),
                    string_agg(CASE WHEN column_name = 'replica_vm_uuid' THEN 'NULL'
                                    ELSE column_name::text END, ', ' ORDER BY ordinal_position)
             FROM information_schema.columns
             WHERE table_name = 'replica_requests' AND column_name <> 'id'",
        )
        .fetch_one(&pool)
        .await?;
        let insert = format!(
            "INSERT INTO bench_rows (id, {columns}) SELECT $2, {values} FROM replica_requests WHERE id = $1"
        );
        let row: uuid::Uuid = sqlx::query_scalar("SELECT id FROM replica_requests LIMIT 1")
            .fetch_one(&pool)
            .await?;
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for client in 0..CLIENTS {
            let (pool, insert) = (pool.clone(), insert.clone());
            let share = burst / CLIENTS + u32::from(client < burst % CLIENTS);
            tasks.spawn(async move {
                for _ in 0..share {
                    sqlx::query(&insert)
                        .bind(row)
                        .bind(uuid::Uuid::now_v7())
                        .execute(&pool)
                        .await?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined??;
        }
        let insert_rate = burst as f64 / started.elapsed().as_secs_f64();
        pool.close().await;
        Ok(Figure::intake(intake_rate, insert_rate, &mut latencies))
    }

    /// The intake's p99 over [`SLOW_BURST`] POSTs with Phala answering at
    /// once, then [`SLOW_PHALA`] later, with every lookup fresh: the cached
    /// ones are waited out, and one order at Phala's normal speed fetches
    /// them again just before. None of the POSTs should wait for Phala.
    async fn intake_with_slow_phala(&self) -> anyhow::Result<Figure> {
        let compose_hash = self
            .sandbox
            .phala
            .world()
            .cvm("api-prod")
            .context("the world has api-prod")?
            .compose_hash();
        let body = json!({"source": "api-prod", "node": "prod-1",
                          "compose_hash": compose_hash, "note": "bench"});
        tokio::time::sleep(LOOKUP_CACHE + Duration::from_secs(1)).await;
        self.post_burst(&body, 1).await?;
        let (_, mut fast) = self.post_burst(&body, SLOW_BURST).await?;
        self.sandbox.phala.set_latency(SLOW_PHALA);
        let slow = self.post_burst(&body, SLOW_BURST).await;
        self.sandbox.phala.set_latency(Duration::ZERO);
        let (_, mut slow) = slow?;
        Ok(Figure::intake_latency(
            &mut fast,
            &mut slow,
            SLOW_PHALA.as_secs_f64() * 1000.0,
        ))
    }

    /// `count` POSTs of `body` by [`CLIENTS`] clients: the rate, and each
    /// answer's latency in seconds.
    async fn post_burst(&self, body: &Value, count: u32) -> anyhow::Result<(f64, Vec<f64>)> {
        let started = Instant::now();
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = tokio::task::JoinSet::new();
        for client in 0..CLIENTS {
            let (http, url, body, latencies) = (
                self.http.clone(),
                self.bridge.join("api/v1/replicas")?,
                body.clone(),
                latencies.clone(),
            );
            let share = count / CLIENTS + u32::from(client < count % CLIENTS);
            tasks.spawn(async move {
                for _ in 0..share {
                    let sent = Instant::now();
                    let answer = http
                        .post(url.clone())
                        .bearer_auth(TOKEN)
                        .json(&body)
                        .send()
                        .await?;
                    anyhow::ensure!(
                        answer.status() == 202,
                        "intake answered {}: {}",
                        answer.status(),
                        answer.text().await.unwrap_or_default()
                    );
                    latencies
                        .lock()
                        .expect("latencies")
                        .push(sent.elapsed().as_secs_f64());
                }
                anyhow::Ok(())
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined??;
        }
        let rate = f64::from(count) / started.elapsed().as_secs_f64();
        let latencies = latencies.lock().expect("latencies").clone();
        Ok((rate, latencies))
    }

    /// Every JSON-RPC call of `serve` (follower, planner, anything else)
    /// per new block, over `blocks` whole blocks of `block` time: counted
    /// from half a block after one block's arrival to half a block after
    /// the arrival of the `blocks`-th next, so that each block's calls
    /// (its polls, its logs, whatever a pass reads) fall in the count
    /// exactly once, as an outside count over many blocks sees them.
    async fn rpc_per_block(&self, blocks: u64, block: Duration) -> anyhow::Result<(f64, f64)> {
        let first = self.next_block(self.heads.latest(), block).await?;
        tokio::time::sleep(block / 2).await;
        let (calls, polls) = self.proxy.counts();
        let last = self.next_block(first + blocks - 1, block).await?;
        tokio::time::sleep(block / 2).await;
        let (calls_after, polls_after) = self.proxy.counts();
        let blocks = last.saturating_sub(first).max(1) as f64;
        Ok((
            (calls_after - calls) as f64 / blocks,
            (polls_after - polls) as f64 / blocks,
        ))
    }

    /// Waits for a block above `after` (at most ten block times); its number.
    async fn next_block(&self, after: u64, block: Duration) -> anyhow::Result<u64> {
        let started = Instant::now();
        loop {
            let latest = self.heads.latest();
            if latest > after {
                return Ok(latest);
            }
            anyhow::ensure!(
                started.elapsed() < block * 10,
                "no block above {after} within ten block times"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The open proposals' nonces and hashes, in nonce order.
    async fn open_proposals(&self) -> anyhow::Result<Vec<(u64, String)>> {
        let mut open: Vec<(u64, String)> = self
            .awaiting_approval()
            .await?
            .into_iter()
            .map(|(nonce, hash, _)| (nonce, hash))
            .collect();
        open.dedup();
        Ok(open)
    }

    /// The requests awaiting approval: each one's proposal nonce and hash,
    /// and its id, in nonce order.
    async fn awaiting_approval(&self) -> anyhow::Result<Vec<(u64, String, String)>> {
        let url = self
            .bridge
            .join("api/v1/replicas?status=awaiting_approval&limit=500")?;
        let list: Value = self
            .http
            .get(url)
            .bearer_auth(TOKEN)
            .send()
            .await?
            .json()
            .await?;
        let mut open: Vec<(u64, String, String)> = list["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| {
                let proposal = &r["proposal"];
                Some((
                    proposal["nonce"].as_u64()?,
                    proposal["safe_tx_hash"].as_str()?.to_owned(),
                    r["id"].as_str()?.to_owned(),
                ))
            })
            .collect();
        open.sort_unstable();
        Ok(open)
    }

    async fn queue(&self, node: u32) -> anyhow::Result<String> {
        let answer: Value = self
            .http
            .post(self.bridge.join("api/v1/replicas")?)
            .bearer_auth(TOKEN)
            .json(&json!({"source": SOURCE, "node": format!("prod-{node}")}))
            .send()
            .await?
            .json()
            .await?;
        answer["replicas"][0]["id"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("intake refused: {answer}"))
    }

    async fn get(&self, id: &str) -> anyhow::Result<Value> {
        let url = self.bridge.join(&format!("api/v1/replicas/{id}"))?;
        Ok(self
            .http
            .get(url)
            .bearer_auth(TOKEN)
            .send()
            .await?
            .json()
            .await?)
    }

    async fn wait_status(&self, id: &str, status: &str, limit: Duration) -> anyhow::Result<Value> {
        let started = Instant::now();
        loop {
            let request = self.get(id).await?;
            if request["status"] == status {
                return Ok(request);
            }
            if request["status"] == "failed" || started.elapsed() > limit {
                bail!("request {id} did not reach {status}: {request}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Owners 0 and 1 sign, the sandbox's executor executes; the execution's
    /// block and gas used.
    async fn sign_and_execute(&self, hash: &str) -> anyhow::Result<(u64, u64)> {
        for owner in [0, 1] {
            let url = self.controls.join(&format!("sandbox/safe/{hash}/sign"))?;
            let answer = self
                .http
                .post(url)
                .json(&json!({"owner": owner}))
                .send()
                .await?;
            anyhow::ensure!(
                answer.status().is_success(),
                "signing: {}",
                answer.text().await?
            );
        }
        let url = self
            .controls
            .join(&format!("sandbox/safe/{hash}/execute"))?;
        let answer = self.http.post(url).send().await?;
        anyhow::ensure!(
            answer.status().is_success(),
            "executing: {}",
            answer.text().await?
        );
        let executed: Value = answer.json().await?;
        let tx: alloy::primitives::B256 =
            serde_json::from_value(executed["transaction_hash"].clone())?;
        let receipt = self
            .sandbox
            .chain
            .provider()
            .get_transaction_receipt(tx)
            .await?
            .context("the execution's receipt")?;
        Ok((
            receipt.block_number.context("a mined execution")?,
            receipt.gas_used,
        ))
    }
}

fn trip(done: &Value, execution_block: u64, gas_used: u64) -> anyhow::Result<Trip> {
    let at = |to: &str| -> anyhow::Result<DateTime<Utc>> {
        let event = done["events"]
            .as_array()
            .into_iter()
            .flatten()
            .rev()
            .find(|e| e["to"] == to)
            .with_context(|| format!("no event to {to}: {done}"))?;
        Ok(serde_json::from_value(event["at"].clone())?)
    };
    Ok(Trip {
        execution_block,
        gas_estimate: done["proposal"]["gas_estimate"].as_u64(),
        gas_used,
        committed_at: at("provisioning")?,
        done_at: at("done")?,
    })
}

fn seconds(delta: chrono::Duration) -> f64 {
    delta.num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}

fn chrono_of(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or_default()
}

/// When each block arrived, from this process's own `newHeads` subscription.
#[derive(Clone)]
struct Heads {
    arrivals: Arc<Mutex<HashMap<u64, DateTime<Utc>>>>,
}

impl Heads {
    async fn follow(ws: Url) -> anyhow::Result<Heads> {
        let provider = ProviderBuilder::new()
            .connect_ws(WsConnect::new(ws.as_str()))
            .await
            .context("opening anvil's WebSocket")?;
        let mut subscription = provider.subscribe_blocks().await?;
        let heads = Heads {
            arrivals: Arc::default(),
        };
        let arrivals = heads.arrivals.clone();
        tokio::spawn(async move {
            let _provider = provider;
            while let Ok(header) = subscription.recv().await {
                arrivals
                    .lock()
                    .expect("arrivals")
                    .insert(header.number, Utc::now());
            }
        });
        Ok(heads)
    }

    fn arrival(&self, block: u64) -> anyhow::Result<DateTime<Utc>> {
        self.arrivals
            .lock()
            .expect("arrivals")
            .get(&block)
            .copied()
            .with_context(|| format!("block {block} was not seen arriving"))
    }

    fn latest(&self) -> u64 {
        self.arrivals
            .lock()
            .expect("arrivals")
            .keys()
            .max()
            .copied()
            .unwrap_or(0)
    }
}

/// Drops and creates `approval_bridge_bench` on the server; its URL.
async fn fresh_database(postgres_url: &str) -> anyhow::Result<String> {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(postgres_url)
        .await
        .context("connecting to Postgres (--postgres-url)")?;
    // A run still going (its `serve` included) would reconnect to the new
    // database and work on this run's requests against its own world.
    let users: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = 'approval_bridge_bench'",
    )
    .fetch_one(&mut admin)
    .await?;
    if users > 0 {
        bail!(
            "the database approval_bridge_bench is in use ({users} connections): is another bench, or its serve, still running?"
        );
    }
    sqlx::query("DROP DATABASE IF EXISTS approval_bridge_bench WITH (FORCE)")
        .execute(&mut admin)
        .await?;
    sqlx::query("CREATE DATABASE approval_bridge_bench")
        .execute(&mut admin)
        .await?;
    let mut url: Url = postgres_url.parse().context("--postgres-url")?;
    url.set_path("/approval_bridge_bench");
    Ok(url.to_string())
}

/// How `serve` learns of new blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Follow {
    /// anvil's `newHeads`, as the sandbox configures it.
    WebSocket,
    /// Polling over HTTP only.
    Polling,
}

/// `serve` of this very binary, as a child process.
struct Serve {
    child: tokio::process::Child,
    url: Url,
}

impl Serve {
    async fn start(
        sandbox: &Sandbox,
        rpc: &Url,
        database_url: &str,
        follow: Follow,
    ) -> anyhow::Result<Serve> {
        let exe = std::env::current_exe().context("finding this binary")?;
        let mut command = tokio::process::Command::new(exe);
        command
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (name, value) in sandbox.env.vars() {
            let polling_only = follow == Follow::Polling && name == "APPROVAL_BRIDGE_WS_URLS";
            if name != crate::sandbox::serve_env::SANDBOX_URL && !polling_only {
                command.env(name, value);
            }
        }
        command
            .env(
                "APPROVAL_BRIDGE_RPC_URLS",
                format!("{}={rpc}", sandbox.chain.chain_id()),
            )
            .env("DATABASE_URL", database_url)
            .env(
                "APPROVAL_BRIDGE_LOOKUP_CACHE_SECS",
                LOOKUP_CACHE.as_secs().to_string(),
            )
            .env("RUST_LOG", "warn")
            .kill_on_drop(true);
        let child = command.spawn().context("starting serve")?;
        let url = sandbox.bridge_url.clone();
        let health = url.join("health")?;
        let started = Instant::now();
        while !reqwest::get(health.clone())
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "serve did not become healthy"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Serve { child, url })
    }

    async fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            // SIGTERM: a graceful stop gives its leases back.
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }
}
