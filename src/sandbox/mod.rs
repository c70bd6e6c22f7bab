//! The local world used by the end-to-end tests and `approval-bridge sandbox`.
//!
//! Everything runs offline from pinned npm packages (`package.json` at the
//! crate root, installed with `npm ci`): anvil, solc-js, and the Safe 1.4.1
//! artifacts. This file finds those tools and builds the project's own test
//! contracts (`contracts/*.sol`); [`chain`] starts anvil and deploys the world.
//!
//! The whole module is a test double of the outside world, compiled only with
//! the `sandbox` feature: nothing outside it may depend on it, apart from the
//! command line (`cli.rs`), which offers `approval-bridge sandbox` and `bench`
//! when the feature is on. The layering test (`layering.rs`) enforces that.
//!
//! It is a feature rather than a crate of its own because the simulators and
//! the integration tests use the crate's own types (the settings, `SafeTx`,
//! the Phala client's wire types and error codes): a second crate would need
//! them all exported as public API, for no gain the layering test does not
//! already give. The production build compiles none of it.

pub mod chain;
mod controls;
pub mod database;
mod dev_login;
pub mod phala_sim;
pub mod safe_service;
pub mod serve_env;
mod world;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::SystemTime;

use alloy::json_abi::JsonAbi;
use alloy::primitives::Bytes;
use anyhow::{Context, bail};

pub use chain::LocalChain;
pub use database::SandboxDatabase;
pub use serve_env::{EnvFormat, ServeEnv};
pub use world::{
    ENS_UNVERIFIED, ENS_VERIFIED, EOA_CVM, OPERATOR_NAME, OWNER_NAMES, SafeOwner, Sandbox,
    SandboxApps, SandboxOptions,
};

/// A file only this project has, used to recognise the project root.
const ROOT_MARKER: &str = "contracts/DstackApp.sol";

/// The directory that holds `package.json`, `node_modules/` and `contracts/`.
///
/// The current directory wins, so an installed binary run from a checkout
/// uses that checkout; the directory this crate was built from is the
/// fallback (tests run there anyway).
pub fn project_root() -> anyhow::Result<PathBuf> {
    let candidates = std::env::current_dir()
        .ok()
        .into_iter()
        .chain(std::iter::once(PathBuf::from(env!("CARGO_MANIFEST_DIR"))));
    for dir in candidates {
        if dir.join(ROOT_MARKER).is_file() {
            return Ok(dir);
        }
    }
    bail!(
        "cannot find the approval-bridge checkout: run from the directory that holds {ROOT_MARKER}"
    )
}

/// `node_modules/` under the project root, or an error that says how to get it.
fn node_modules(root: &Path) -> anyhow::Result<PathBuf> {
    let dir = root.join("node_modules");
    if !dir.is_dir() {
        bail!(
            "{} is missing: run `npm ci` in {} to install the pinned anvil, solc and Safe contracts",
            dir.display(),
            root.display()
        );
    }
    Ok(dir)
}

/// The anvil binary: `ANVIL_BIN`, else the pinned npm one, else `anvil` on `PATH`.
pub fn anvil_binary(root: &Path) -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("ANVIL_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!(
                "ANVIL_BIN points to {}, which does not exist",
                bin.display()
            );
        }
        return Ok(bin);
    }
    let pinned = root.join("node_modules/.bin/anvil");
    if pinned.is_file() {
        return Ok(pinned);
    }
    if let Some(on_path) = find_on_path("anvil") {
        return Ok(on_path);
    }
    bail!(
        "anvil not found: run `npm ci` in {} (installs the pinned anvil), or set ANVIL_BIN",
        root.display()
    )
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// A compiled contract, loaded at run time: creation bytecode and ABI.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub abi: JsonAbi,
    pub bytecode: Bytes,
}

/// Loads `contract` from `contracts/<source>.sol`, compiling first if needed.
pub fn project_artifact(root: &Path, source: &str, contract: &str) -> anyhow::Result<Artifact> {
    let out = compile_contracts(root)?;
    let stem = out.join(format!("{source}_sol_{contract}"));
    let abi_path = stem.with_extension("abi");
    let bin_path = stem.with_extension("bin");
    let abi = std::fs::read_to_string(&abi_path)
        .with_context(|| format!("reading {}", abi_path.display()))?;
    let abi: JsonAbi =
        serde_json::from_str(&abi).with_context(|| format!("parsing {}", abi_path.display()))?;
    let bin = std::fs::read_to_string(&bin_path)
        .with_context(|| format!("reading {}", bin_path.display()))?;
    let bytecode: Bytes = hex::decode(bin.trim())
        .with_context(|| format!("decoding {}", bin_path.display()))?
        .into();
    if bytecode.is_empty() {
        bail!("{contract} in {source}.sol is abstract: it has no bytecode");
    }
    Ok(Artifact { abi, bytecode })
}

/// Reads a Hardhat artifact from `@safe-global/safe-contracts`, e.g.
/// `SafeL2.sol/SafeL2.json`.
pub fn safe_artifact(root: &Path, relative: &str) -> anyhow::Result<Artifact> {
    let path = node_modules(root)?
        .join("@safe-global/safe-contracts/build/artifacts/contracts")
        .join(relative);
    let json = read_json(&path)?;
    let abi = serde_json::from_value(json["abi"].clone())
        .with_context(|| format!("parsing the ABI in {}", path.display()))?;
    let bytecode = json["bytecode"]
        .as_str()
        .and_then(|hex| hex.parse::<Bytes>().ok())
        .with_context(|| format!("no bytecode in {}", path.display()))?;
    Ok(Artifact { abi, bytecode })
}

/// Reads a JSON file from an installed npm package.
pub fn npm_json(root: &Path, relative: &str) -> anyhow::Result<serde_json::Value> {
    read_json(&node_modules(root)?.join(relative))
}

fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Tests in one process start chains in parallel; one compile at a time is
/// enough, and the later callers then find fresh outputs.
static COMPILE_LOCK: Mutex<()> = Mutex::new(());

/// Compiles every `contracts/*.sol` whose outputs are missing or older than
/// the source into `target/contracts/`, and returns that directory.
///
/// solcjs names outputs `<File>_sol_<Contract>.{bin,abi}`. It writes into a
/// private temporary directory first and the files are renamed into place,
/// so another process (another test binary, the sandbox) never reads half a file.
pub fn compile_contracts(root: &Path) -> anyhow::Result<PathBuf> {
    let _guard = COMPILE_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let sources_dir = root.join("contracts");
    let out = root.join("target/contracts");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    let mut stale = Vec::new();
    for entry in std::fs::read_dir(&sources_dir)
        .with_context(|| format!("listing {}", sources_dir.display()))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "sol") && !outputs_fresh(&path, &out)? {
            stale.push(path);
        }
    }
    if stale.is_empty() {
        return Ok(out);
    }
    stale.sort();

    let solcjs = node_modules(root)?.join(".bin/solcjs");
    if !solcjs.is_file() {
        bail!(
            "{} is missing: run `npm ci` in {}",
            solcjs.display(),
            root.display()
        );
    }
    let scratch = out.join(format!(".build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let names: Vec<_> = stale.iter().filter_map(|path| path.file_name()).collect();
    tracing::debug!(?names, "compiling contracts with solcjs");
    // Run from contracts/ with bare file names so output names carry no path.
    let output = Command::new(&solcjs)
        .current_dir(&sources_dir)
        .args(["--bin", "--abi", "--optimize", "--base-path", ".", "-o"])
        .arg(&scratch)
        .args(&names)
        .output()
        .with_context(|| format!("running {}", solcjs.display()))?;
    if !output.status.success() {
        let _ = std::fs::remove_dir_all(&scratch);
        bail!(
            "solcjs failed on {names:?}: {}{}",
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
    }
    for entry in std::fs::read_dir(&scratch)? {
        let path = entry?.path();
        let name = path.file_name().expect("read_dir yields named entries");
        std::fs::rename(&path, out.join(name))
            .with_context(|| format!("moving {} into {}", path.display(), out.display()))?;
    }
    std::fs::remove_dir_all(&scratch)?;
    Ok(out)
}

/// Whether `<File>_sol_*.{bin,abi}` exist for `source` and are all newer than it.
fn outputs_fresh(source: &Path, out: &Path) -> anyhow::Result<bool> {
    let stem = source
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    let prefix = format!("{stem}_sol_");
    let source_time = modified(source)?;
    let mut found = false;
    for entry in std::fs::read_dir(out)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with(&prefix) && (name.ends_with(".bin") || name.ends_with(".abi")) {
            found = true;
            if modified(&path)? <= source_time {
                return Ok(false);
            }
        }
    }
    Ok(found)
}

fn modified(path: &Path) -> anyhow::Result<SystemTime> {
    std::fs::metadata(path)
        .and_then(|meta| meta.modified())
        .with_context(|| format!("reading the mtime of {}", path.display()))
}

/// Installs the pinned npm packages (anvil, solc-js, the Safe artifacts)
/// when they are missing: the one-time set-up of the sandbox.
pub fn ensure_npm_packages() -> anyhow::Result<()> {
    let root = project_root()?;
    let installed = root.join("node_modules/.bin/solcjs").is_file()
        && root
            .join("node_modules/@safe-global/safe-contracts")
            .is_dir();
    if installed {
        return Ok(());
    }
    eprintln!("approval-bridge: installing the pinned npm packages (one time): npm ci");
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&root)
        .status()
        .context("cannot run npm: install Node.js and npm")?;
    if !status.success() {
        bail!("`npm ci` failed in {}", root.display());
    }
    Ok(())
}
