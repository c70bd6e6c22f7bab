//! A local anvil chain with the real Safe 1.4.1 contracts at their canonical
//! addresses, the project's DstackApp stand-ins and a Multicall3.
//!
//! [`LocalChain::start`] builds the world the same way every time:
//! 1. anvil on a free loopback port (chain id 31337, the default mnemonic);
//! 2. the Safe singleton factory, from its presigned chain-31337 transaction;
//! 3. six Safe 1.4.1 contracts through that factory with salt 0, which puts
//!    them at the addresses they have on mainnet and Base (`safe.md` §6);
//! 4. our Multicall3 runtime code at Multicall3's canonical address.
//!
//! The helpers below play the parts of the humans around the service: deploy
//! an app, create a Safe, hand the app to the Safe, and sign and execute Safe
//! transactions.

use std::path::PathBuf;
use std::time::Instant;

use alloy::dyn_abi::{DynSolValue, JsonAbiExt};
use alloy::network::{EthereumWallet, TransactionBuilder};
use alloy::node_bindings::{Anvil, AnvilInstance};
use alloy::primitives::{Address, B256, Bytes, U256, address, keccak256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::{TransactionReceipt, TransactionRequest};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol;
use alloy::sol_types::SolCall;
use anyhow::{Context, bail, ensure};
use reqwest::Url;

use super::{Artifact, anvil_binary, compile_contracts, npm_json, project_artifact, safe_artifact};
use crate::chain::ChainClient;
use crate::safe::{Call, Deployment, ISafe, SafeTx, SafeVersion, build_safe_tx, sign_safe_tx_hash};

/// Canonical Safe v1.4.1 addresses (CREATE2 from the singleton factory, salt 0).
pub mod v1_4_1 {
    use alloy::primitives::{Address, address};

    pub const SAFE: Address = address!("41675C099F32341bf84BFc5382aF534df5C7461a");
    pub const SAFE_L2: Address = address!("29fcB43b46531BcA003ddC8FCB67FFE91900C762");
    pub const SAFE_PROXY_FACTORY: Address = address!("4e1DCf7AD4e460CfD30791CCC4F9c8a4f820ec67");
    pub const MULTI_SEND: Address = address!("38869bf66a61cF6bDB996A6aE40D5853Fd43B526");
    pub const MULTI_SEND_CALL_ONLY: Address = address!("9641d764fc13c8B624c04430C7356C1C7C8102e2");
    pub const COMPATIBILITY_FALLBACK_HANDLER: Address =
        address!("fd0732Dc9E303f09fCEf3a7388Ad10A83459Ec99");
}

/// The Safe singleton factory (CREATE2 deployer behind the v1.4.1 addresses).
pub const SAFE_SINGLETON_FACTORY: Address = address!("914d7Fec6aaC8cd542e72Bca78B30650d45643d7");
/// Multicall3's address on every chain that has it.
pub const MULTICALL3: Address = address!("cA11bde05977b3631167028862bE2a173976CA11");
/// The chain id the presigned factory transaction was signed for.
pub const CHAIN_ID: u64 = 31337;
/// How many funded dev accounts anvil creates from its default mnemonic.
pub const DEV_ACCOUNTS: usize = 10;

sol! {
    /// The Safe (1.4.1) functions and events the sandbox uses beyond the
    /// bridge's own [`ISafe`], which has the reads and `execTransaction`.
    // The generated `setup` method mirrors the ABI.
    #[allow(clippy::too_many_arguments)]
    #[sol(rpc)]
    interface ISafeMore {
        function setup(
            address[] calldata _owners,
            uint256 _threshold,
            address to,
            bytes calldata data,
            address fallbackHandler,
            address paymentToken,
            uint256 payment,
            address paymentReceiver
        ) external;
        function swapOwner(address prevOwner, address oldOwner, address newOwner) external;
        function addOwnerWithThreshold(address owner, uint256 _threshold) external;

        event ExecutionSuccess(bytes32 indexed txHash, uint256 payment);
        event ExecutionFailure(bytes32 indexed txHash, uint256 payment);
    }

    /// What a Safe's owners sign for the Safe to accept a signature of a
    /// hash (EIP-1271 through the CompatibilityFallbackHandler): the Safe's
    /// EIP-712 hash, in the Safe's own domain, of `abi.encode(hash)`.
    struct SafeMessage {
        bytes message;
    }

    /// The setters of the sandbox's minimal ENS (`contracts/Ens.sol`).
    interface IEnsSetters {
        function setResolver(bytes32 node, address resolverAddress) external;
        function setName(bytes32 node, string calldata newName) external;
        function setAddr(bytes32 node, address newAddr) external;
    }

    #[sol(rpc)]
    interface ISafeProxyFactory {
        function createProxyWithNonce(address _singleton, bytes memory initializer, uint256 saltNonce)
            external returns (address proxy);

        event ProxyCreation(address indexed proxy, address singleton);
    }

    /// MultiSend's entry point, to read the packed calls of a batch back.
    #[sol(rpc)]
    interface IMultiSend {
        function multiSend(bytes memory transactions) external payable;
    }

    #[sol(rpc)]
    interface IMulticall3 {
        struct Call3 {
            address target;
            bool allowFailure;
            bytes callData;
        }
        // Named `Result` in Multicall3; only the tuple shape reaches the ABI.
        struct CallResult {
            bool success;
            bytes returnData;
        }
        function aggregate3(Call3[] calldata calls) external payable returns (CallResult[] memory returnData);
    }

    /// DstackApp as the service sees it (`dstack-app.md` §1.3–1.4); both
    /// stand-ins implement it, `pendingOwner`/`acceptOwnership` only the
    /// two-step one.
    #[sol(rpc)]
    interface IDstackApp {
        function owner() external view returns (address);
        function pendingOwner() external view returns (address);
        function allowAnyDevice() external view returns (bool);
        function allowedComposeHashes(bytes32 composeHash) external view returns (bool);
        function allowedDeviceIds(bytes32 deviceId) external view returns (bool);
        function addComposeHash(bytes32 composeHash) external;
        function removeComposeHash(bytes32 composeHash) external;
        function addDevice(bytes32 deviceId) external;
        function removeDevice(bytes32 deviceId) external;
        function setAllowAnyDevice(bool allowAny) external;
        function transferOwnership(address newOwner) external;
        function acceptOwnership() external;
        function renounceOwnership() external;

        event ComposeHashAdded(bytes32 composeHash);
        event ComposeHashRemoved(bytes32 composeHash);
        event DeviceAdded(bytes32 deviceId);
        event DeviceRemoved(bytes32 deviceId);
        event AllowAnyDeviceSet(bool allowAny);
        event OwnershipTransferred(address indexed previousOwner, address indexed newOwner);
        event OwnershipTransferStarted(address indexed previousOwner, address indexed newOwner);

        error OwnableUnauthorizedAccount(address account);
        error OwnableInvalidOwner(address owner);
    }
}

/// The Safe 1.4.1 contracts the world deploys, with where to find them in
/// `@safe-global/safe-contracts` and `@safe-global/safe-deployments`.
struct SafeContract {
    name: &'static str,
    artifact: &'static str,
    deployment: &'static str,
    address: Address,
}

const SAFE_CONTRACTS: [SafeContract; 6] = [
    SafeContract {
        name: "SafeL2",
        artifact: "SafeL2.sol/SafeL2.json",
        deployment: "safe_l2.json",
        address: v1_4_1::SAFE_L2,
    },
    SafeContract {
        name: "Safe",
        artifact: "Safe.sol/Safe.json",
        deployment: "safe.json",
        address: v1_4_1::SAFE,
    },
    SafeContract {
        name: "SafeProxyFactory",
        artifact: "proxies/SafeProxyFactory.sol/SafeProxyFactory.json",
        deployment: "safe_proxy_factory.json",
        address: v1_4_1::SAFE_PROXY_FACTORY,
    },
    SafeContract {
        name: "MultiSend",
        artifact: "libraries/MultiSend.sol/MultiSend.json",
        deployment: "multi_send.json",
        address: v1_4_1::MULTI_SEND,
    },
    SafeContract {
        name: "MultiSendCallOnly",
        artifact: "libraries/MultiSendCallOnly.sol/MultiSendCallOnly.json",
        deployment: "multi_send_call_only.json",
        address: v1_4_1::MULTI_SEND_CALL_ONLY,
    },
    SafeContract {
        name: "CompatibilityFallbackHandler",
        artifact: "handler/CompatibilityFallbackHandler.sol/CompatibilityFallbackHandler.json",
        deployment: "compatibility_fallback_handler.json",
        address: v1_4_1::COMPATIBILITY_FALLBACK_HANDLER,
    },
];

/// A running anvil with the world deployed. Dropping it stops anvil (also
/// while a test unwinds from a panic).
pub struct LocalChain {
    root: PathBuf,
    provider: DynProvider,
    /// The bridge's own client of this chain, for the Safe's hash of a transaction.
    client: ChainClient,
    signers: Vec<PrivateKeySigner>,
    block_time: Option<u64>,
    // Last, so the process outlives every other field; its Drop stops anvil.
    anvil: AnvilInstance,
}

impl std::fmt::Debug for LocalChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalChain")
            .field("rpc_url", &self.anvil.endpoint())
            .field("block_time", &self.block_time)
            .finish_non_exhaustive()
    }
}

impl LocalChain {
    /// Starts anvil and deploys the world. With `block_time`, anvil mines a
    /// block every that many seconds once the world is deployed (deploying
    /// under automine keeps start-up fast); without it, every transaction is
    /// mined at once.
    pub async fn start(block_time: Option<u64>) -> anyhow::Result<LocalChain> {
        let started = Instant::now();
        let root = super::project_root()?;
        let anvil_bin = anvil_binary(&root)?;
        // Blocking work (solcjs, waiting for anvil's banner) off the runtime.
        let compile_root = root.clone();
        let compiling = tokio::task::spawn_blocking(move || compile_contracts(&compile_root));
        let anvil = tokio::task::spawn_blocking(move || spawn_anvil(anvil_bin))
            .await
            .context("the anvil start-up task failed")??;
        compiling
            .await
            .context("the solcjs task failed")?
            .context("compiling contracts/")?;

        let signers: Vec<PrivateKeySigner> =
            anvil.keys().iter().map(PrivateKeySigner::from).collect();
        ensure!(
            signers.len() >= DEV_ACCOUNTS,
            "anvil printed {} dev accounts, expected {DEV_ACCOUNTS}",
            signers.len()
        );
        let mut wallet = EthereumWallet::new(signers[0].clone());
        for signer in &signers[1..] {
            wallet.register_signer(signer.clone());
        }
        let provider = ProviderBuilder::new()
            .wallet(wallet)
            .connect_http(anvil.endpoint_url())
            .erased();
        let chain = LocalChain {
            root,
            provider,
            client: ChainClient::new(CHAIN_ID, anvil.endpoint_url()),
            signers,
            block_time,
            anvil,
        };
        let spawned = started.elapsed();

        let chain_id = chain.provider.get_chain_id().await?;
        ensure!(
            chain_id == CHAIN_ID,
            "anvil runs chain {chain_id}, expected {CHAIN_ID}"
        );
        chain.deploy_singleton_factory().await?;
        chain.deploy_safe_contracts().await?;
        chain.install_multicall3().await?;
        if let Some(seconds) = block_time {
            let _: serde_json::Value = chain
                .provider
                .raw_request("evm_setIntervalMining".into(), (seconds,))
                .await
                .context("switching anvil to interval mining")?;
        }
        tracing::debug!(
            rpc_url = %chain.rpc_url(),
            anvil_ms = spawned.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "local chain ready"
        );
        Ok(chain)
    }

    pub fn rpc_url(&self) -> Url {
        self.anvil.endpoint_url()
    }

    /// The same anvil over WebSocket, for `newHeads`.
    pub fn ws_url(&self) -> Url {
        self.anvil.ws_endpoint_url()
    }

    pub fn chain_id(&self) -> u64 {
        CHAIN_ID
    }

    pub fn block_time(&self) -> Option<u64> {
        self.block_time
    }

    /// A provider whose wallet holds every dev account; it sends from account
    /// 0 unless a request sets `from`.
    pub fn provider(&self) -> &DynProvider {
        &self.provider
    }

    /// Dev account `index` (0..10). Panics on a larger index.
    pub fn address(&self, index: usize) -> Address {
        self.signers[index].address()
    }

    /// All dev accounts, in anvil's order.
    pub fn addresses(&self) -> Vec<Address> {
        self.signers.iter().map(PrivateKeySigner::address).collect()
    }

    /// The signer of dev account `index` (0..10). Panics on a larger index.
    pub fn signer(&self, index: usize) -> PrivateKeySigner {
        self.signers[index].clone()
    }

    /// The private key of dev account `index` (0..10). Panics on a larger index.
    pub fn private_key(&self, index: usize) -> B256 {
        self.signers[index].to_bytes()
    }

    pub async fn set_balance(&self, account: Address, wei: U256) -> anyhow::Result<()> {
        let _: serde_json::Value = self
            .provider
            .raw_request("anvil_setBalance".into(), (account, wei))
            .await
            .with_context(|| format!("anvil_setBalance({account})"))?;
        Ok(())
    }

    /// Creates a Safe proxy of the v1.4.1 SafeL2 singleton with the
    /// CompatibilityFallbackHandler, sent by dev account 0.
    pub async fn create_safe(
        &self,
        owners: &[Address],
        threshold: u64,
        salt_nonce: u64,
    ) -> anyhow::Result<Address> {
        let initializer = ISafeMore::setupCall {
            _owners: owners.to_vec(),
            _threshold: U256::from(threshold),
            to: Address::ZERO,
            data: Bytes::new(),
            fallbackHandler: v1_4_1::COMPATIBILITY_FALLBACK_HANDLER,
            paymentToken: Address::ZERO,
            payment: U256::ZERO,
            paymentReceiver: Address::ZERO,
        }
        .abi_encode();
        let data = ISafeProxyFactory::createProxyWithNonceCall {
            _singleton: v1_4_1::SAFE_L2,
            initializer: initializer.into(),
            saltNonce: U256::from(salt_nonce),
        }
        .abi_encode();
        let tx = TransactionRequest::default()
            .with_to(v1_4_1::SAFE_PROXY_FACTORY)
            .with_input(data);
        let receipt = self
            .send(&self.signers[0], tx)
            .await
            .context("creating a Safe")?;
        let safe = receipt
            .logs()
            .iter()
            .filter(|log| log.address() == v1_4_1::SAFE_PROXY_FACTORY)
            .find_map(|log| log.log_decode::<ISafeProxyFactory::ProxyCreation>().ok())
            .map(|log| log.inner.data.proxy)
            .context("the factory emitted no ProxyCreation")?;
        Ok(safe)
    }

    /// Deploys a DstackApp stand-in from dev account 0: one-step ownership
    /// (`DstackApp`, no `pendingOwner()`) or two-step (`DstackApp2Step`).
    pub async fn deploy_dstack_app(
        &self,
        owner: Address,
        two_step: bool,
    ) -> anyhow::Result<Address> {
        let contract = if two_step {
            "DstackApp2Step"
        } else {
            "DstackApp"
        };
        self.deploy_contract("DstackApp", contract, &[DynSolValue::Address(owner)])
            .await
    }

    /// Deploys the DstackKms stand-in whose `kmsInfo()` holds `root_key`
    /// (SEC1 bytes), the key that signs env encryption keys.
    pub async fn deploy_dstack_kms(
        &self,
        owner: Address,
        root_key: &[u8],
    ) -> anyhow::Result<Address> {
        self.deploy_contract(
            "DstackKms",
            "DstackKms",
            &[
                DynSolValue::Address(owner),
                DynSolValue::Bytes(root_key.to_vec()),
            ],
        )
        .await
    }

    /// Deploys `contract` from `contracts/<source>.sol` with the given
    /// constructor arguments, sent by dev account 0.
    pub async fn deploy_contract(
        &self,
        source: &str,
        contract: &str,
        constructor_args: &[DynSolValue],
    ) -> anyhow::Result<Address> {
        let artifact = project_artifact(&self.root, source, contract)?;
        let code = if constructor_args.is_empty() && artifact.abi.constructor.is_none() {
            artifact.bytecode
        } else {
            with_constructor_args(&artifact, constructor_args)?
        };
        let tx = TransactionRequest::default().with_deploy_code(code);
        let receipt = self
            .send(&self.signers[0], tx)
            .await
            .with_context(|| format!("deploying {contract}"))?;
        receipt
            .contract_address
            .with_context(|| format!("deploying {contract} created no contract"))
    }

    /// Sends `transferOwnership(new_owner)` to `app` from its current owner.
    /// One-step apps change owner at once; two-step apps only stage it.
    pub async fn transfer_ownership(
        &self,
        app: Address,
        owner: &PrivateKeySigner,
        new_owner: Address,
    ) -> anyhow::Result<TransactionReceipt> {
        let data = IDstackApp::transferOwnershipCall {
            newOwner: new_owner,
        }
        .abi_encode();
        let tx = TransactionRequest::default().with_to(app).with_input(data);
        self.send(owner, tx)
            .await
            .with_context(|| format!("transferOwnership({new_owner}) on {app}"))
    }

    /// Makes `safe` the owner of `app`, whichever ownership model the app has:
    /// after `transferOwnership`, a two-step app still names the old owner,
    /// so the Safe runs `acceptOwnership()` as a Safe transaction signed by
    /// `safe_signers` and sent by `executor`.
    pub async fn transfer_app_to_safe(
        &self,
        app: Address,
        owner: &PrivateKeySigner,
        safe: Address,
        safe_signers: &[PrivateKeySigner],
        executor: &PrivateKeySigner,
    ) -> anyhow::Result<()> {
        self.transfer_ownership(app, owner, safe).await?;
        let dstack_app = IDstackApp::new(app, &self.provider);
        if dstack_app.owner().call().await? == safe {
            return Ok(());
        }
        let pending = dstack_app
            .pendingOwner()
            .call()
            .await
            .context("owner() did not change and the app has no pendingOwner()")?;
        ensure!(
            pending == safe,
            "pendingOwner() is {pending}, not the Safe {safe}"
        );
        let accept = Call {
            to: app,
            value: U256::ZERO,
            data: IDstackApp::acceptOwnershipCall {}.abi_encode().into(),
        };
        self.exec_calls(safe, &[accept], safe_signers, executor)
            .await
            .context("the Safe accepting ownership")?;
        let now = dstack_app.owner().call().await?;
        ensure!(
            now == safe,
            "owner() is {now} after acceptOwnership, not the Safe {safe}"
        );
        Ok(())
    }

    /// The Safe's current nonce.
    pub async fn safe_nonce(&self, safe: Address) -> anyhow::Result<u64> {
        let nonce = ISafe::new(safe, &self.provider)
            .nonce()
            .call()
            .await
            .with_context(|| format!("nonce() on {safe}"))?;
        Ok(nonce.try_into()?)
    }

    /// `calls` as the next transaction of a 1.4.1 `safe`, at its current
    /// nonce: one call goes out as it is, several as a MultiSendCallOnly
    /// batch, as the bridge builds them.
    pub async fn next_safe_tx(&self, safe: Address, calls: &[Call]) -> anyhow::Result<SafeTx> {
        let nonce = self.safe_nonce(safe).await?;
        Ok(build_safe_tx(
            calls,
            SafeVersion::V1_4_1,
            Deployment::Canonical,
            nonce,
        )?)
    }

    /// The SafeTx hash as the Safe itself computes it (`getTransactionHash`).
    pub async fn safe_tx_hash(&self, safe: Address, tx: &SafeTx) -> anyhow::Result<B256> {
        self.client
            .safe_tx_hash(safe, tx)
            .await
            .with_context(|| format!("getTransactionHash on {safe}"))
    }

    /// Executes `tx` as it is (its nonce must be the Safe's current one):
    /// hashes it with the Safe's `getTransactionHash`, signs with each of
    /// `signers`, and sends `execTransaction` from `executor` (any funded
    /// account; owners need not pay gas). Fails unless the Safe reports
    /// `ExecutionSuccess`.
    pub async fn exec_safe_tx(
        &self,
        safe: Address,
        tx: &SafeTx,
        signers: &[PrivateKeySigner],
        executor: &PrivateKeySigner,
    ) -> anyhow::Result<TransactionReceipt> {
        let hash = self.safe_tx_hash(safe, tx).await?;
        let signatures = owner_signatures(hash, signers)?;
        let data = ISafe::execTransactionCall {
            to: tx.to,
            value: tx.value,
            data: tx.data.clone(),
            operation: tx.operation.into(),
            safeTxGas: tx.safe_tx_gas,
            baseGas: tx.base_gas,
            gasPrice: tx.gas_price,
            gasToken: tx.gas_token,
            refundReceiver: tx.refund_receiver,
            signatures,
        }
        .abi_encode();
        let request = TransactionRequest::default().with_to(safe).with_input(data);
        let receipt = self
            .send(executor, request)
            .await
            .with_context(|| format!("execTransaction {hash} on {safe}"))?;
        let succeeded = receipt.logs().iter().any(|log| {
            log.address() == safe
                && log
                    .log_decode::<ISafeMore::ExecutionSuccess>()
                    .is_ok_and(|event| event.inner.data.txHash == hash)
        });
        ensure!(
            succeeded,
            "Safe tx {hash} on {safe} emitted no ExecutionSuccess"
        );
        Ok(receipt)
    }

    /// Makes `calls` through `safe` now: [`next_safe_tx`](Self::next_safe_tx)
    /// signed by `signers` and executed by `executor`.
    pub async fn exec_calls(
        &self,
        safe: Address,
        calls: &[Call],
        signers: &[PrivateKeySigner],
        executor: &PrivateKeySigner,
    ) -> anyhow::Result<TransactionReceipt> {
        let tx = self.next_safe_tx(safe, calls).await?;
        self.exec_safe_tx(safe, &tx, signers, executor).await
    }

    /// Sends `tx` signed by `signer` and waits for a successful receipt.
    /// Dev accounts go through the shared provider; any other key gets its
    /// own short-lived one.
    async fn send(
        &self,
        signer: &PrivateKeySigner,
        tx: TransactionRequest,
    ) -> anyhow::Result<TransactionReceipt> {
        let from = signer.address();
        let tx = tx.with_from(from);
        let pending = if self.signers.iter().any(|dev| dev.address() == from) {
            self.provider.send_transaction(tx).await?
        } else {
            ProviderBuilder::new()
                .wallet(EthereumWallet::new(signer.clone()))
                .connect_http(self.rpc_url())
                .send_transaction(tx)
                .await?
        };
        let receipt = pending.get_receipt().await?;
        if !receipt.status() {
            bail!(
                "transaction {} from {from} reverted",
                receipt.transaction_hash
            );
        }
        Ok(receipt)
    }

    /// The factory comes from a presigned legacy transaction (chain 31337);
    /// its signer only needs gas money.
    async fn deploy_singleton_factory(&self) -> anyhow::Result<()> {
        let deployment = npm_json(
            &self.root,
            "@safe-global/safe-singleton-factory/artifacts/31337/deployment.json",
        )?;
        let field = |name: &str| {
            deployment[name]
                .as_str()
                .with_context(|| format!("no {name} in the singleton factory deployment"))
        };
        let factory: Address = field("address")?.parse()?;
        ensure!(
            factory == SAFE_SINGLETON_FACTORY,
            "the npm singleton factory is at {factory}, expected {SAFE_SINGLETON_FACTORY}"
        );
        let signer: Address = field("signerAddress")?.parse()?;
        let raw: Bytes = field("transaction")?.parse()?;
        self.set_balance(signer, U256::from(10u128.pow(18))).await?;
        let receipt = self
            .provider
            .send_raw_transaction(&raw)
            .await
            .context("publishing the singleton factory transaction")?
            .get_receipt()
            .await?;
        ensure!(
            receipt.status(),
            "the singleton factory deployment reverted"
        );
        ensure!(
            !self.provider.get_code_at(factory).await?.is_empty(),
            "no code at the singleton factory {factory}"
        );
        Ok(())
    }

    /// CREATE2 with salt 0 through the singleton factory; each contract must
    /// land at its canonical address with the code hash safe-deployments lists.
    async fn deploy_safe_contracts(&self) -> anyhow::Result<()> {
        for contract in &SAFE_CONTRACTS {
            let artifact = safe_artifact(&self.root, contract.artifact)?;
            let predicted =
                SAFE_SINGLETON_FACTORY.create2_from_code(B256::ZERO, &artifact.bytecode);
            ensure!(
                predicted == contract.address,
                "{}: the npm artifact would land at {predicted}, not at {}",
                contract.name,
                contract.address
            );
            let listed = npm_json(
                &self.root,
                &format!(
                    "@safe-global/safe-deployments/dist/assets/v1.4.1/{}",
                    contract.deployment
                ),
            )?;
            let canonical = &listed["deployments"]["canonical"];
            let listed_address: Address = canonical["address"]
                .as_str()
                .context("no canonical address in safe-deployments")?
                .parse()?;
            let code_hash: B256 = canonical["codeHash"]
                .as_str()
                .context("no canonical codeHash in safe-deployments")?
                .parse()?;
            ensure!(
                listed_address == contract.address,
                "{}: safe-deployments lists {listed_address}, expected {}",
                contract.name,
                contract.address
            );

            // The factory's call data is the 32-byte salt followed by the init code.
            let mut data = B256::ZERO.to_vec();
            data.extend_from_slice(&artifact.bytecode);
            let tx = TransactionRequest::default()
                .with_to(SAFE_SINGLETON_FACTORY)
                .with_input(data);
            self.send(&self.signers[0], tx)
                .await
                .with_context(|| format!("deploying {}", contract.name))?;
            let code = self.provider.get_code_at(contract.address).await?;
            ensure!(
                keccak256(&code) == code_hash,
                "{} at {}: code hash {} differs from the canonical {code_hash}",
                contract.name,
                contract.address,
                keccak256(&code)
            );
        }
        Ok(())
    }

    /// Puts a minimal ENS on the chain: the registry at its real address
    /// and one resolver holding every record. Each `(account, name,
    /// name_points_to)` gives `account` the reverse name `name`, whose
    /// forward record is `name_points_to` (the account itself for a name
    /// that verifies). All records are set in one Multicall3 transaction.
    pub async fn install_ens(&self, records: &[(Address, &str, Address)]) -> anyhow::Result<()> {
        use crate::chain::{ENS_REGISTRY, namehash};
        let registry = project_artifact(&self.root, "Ens", "EnsRegistry")?;
        let runtime = self
            .provider
            .call(TransactionRequest::default().with_deploy_code(registry.bytecode))
            .await
            .context("building the ENS registry's runtime code")?;
        let _: serde_json::Value = self
            .provider
            .raw_request("anvil_setCode".into(), (ENS_REGISTRY, runtime))
            .await
            .context("anvil_setCode for the ENS registry")?;
        let resolver = self.deploy_contract("Ens", "EnsResolver", &[]).await?;
        let mut calls = Vec::new();
        let mut push = |target: Address, data: Vec<u8>| {
            calls.push(IMulticall3::Call3 {
                target,
                allowFailure: false,
                callData: data.into(),
            });
        };
        for (account, name, points_to) in records {
            let reverse = namehash(&format!("{}.addr.reverse", hex::encode(account)));
            let forward = namehash(name);
            for node in [reverse, forward] {
                let set = IEnsSetters::setResolverCall {
                    node,
                    resolverAddress: resolver,
                };
                push(ENS_REGISTRY, set.abi_encode());
            }
            let set_name = IEnsSetters::setNameCall {
                node: reverse,
                newName: (*name).to_owned(),
            };
            push(resolver, set_name.abi_encode());
            let set_addr = IEnsSetters::setAddrCall {
                node: forward,
                newAddr: *points_to,
            };
            push(resolver, set_addr.abi_encode());
        }
        let tx = TransactionRequest::default()
            .to(MULTICALL3)
            .input(IMulticall3::aggregate3Call { calls }.abi_encode().into());
        self.send(&self.signers[0], tx)
            .await
            .context("setting the ENS records")?;
        Ok(())
    }

    /// An `eth_call` of the creation code returns the runtime code without
    /// deploying anything; `anvil_setCode` then puts it at the canonical
    /// address (the contract has no constructor state to lose).
    async fn install_multicall3(&self) -> anyhow::Result<()> {
        let artifact = project_artifact(&self.root, "Multicall3", "Multicall3")?;
        let runtime = self
            .provider
            .call(TransactionRequest::default().with_deploy_code(artifact.bytecode))
            .await
            .context("building the Multicall3 runtime code")?;
        ensure!(!runtime.is_empty(), "Multicall3 produced no runtime code");
        let _: serde_json::Value = self
            .provider
            .raw_request("anvil_setCode".into(), (MULTICALL3, runtime))
            .await
            .context("anvil_setCode for Multicall3")?;
        Ok(())
    }
}

/// Spawns anvil on a free loopback port and keeps draining its stdout: alloy
/// stops reading after the banner, and a full pipe would stall anvil.
fn spawn_anvil(bin: PathBuf) -> anyhow::Result<AnvilInstance> {
    let mut anvil = Anvil::new()
        .path(&bin)
        .host("127.0.0.1")
        .chain_id(CHAIN_ID)
        .keep_stdout()
        .try_spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    if let Some(mut stdout) = anvil.child_mut().stdout.take() {
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    }
    Ok(anvil)
}

/// The owners' signatures of `hash` (v = 27/28), concatenated in ascending
/// owner order, the order `checkNSignatures` demands.
fn owner_signatures(hash: B256, signers: &[PrivateKeySigner]) -> anyhow::Result<Bytes> {
    let mut sorted: Vec<&PrivateKeySigner> = signers.iter().collect();
    sorted.sort_by_key(|signer| signer.address());
    let mut signatures = Vec::with_capacity(65 * sorted.len());
    for signer in sorted {
        let signature = sign_safe_tx_hash(signer, hash)
            .with_context(|| format!("signing {hash} as {}", signer.address()))?;
        signatures.extend_from_slice(&signature);
    }
    Ok(signatures.into())
}

/// The signature a Safe (1.3.0 or later, with the CompatibilityFallbackHandler)
/// accepts for `hash` in `isValidSignature(bytes32,bytes)`: its owners'
/// signatures (v = 27/28, ascending owner order) of the Safe's `SafeMessage`
/// hash of `hash`. The handler computes that hash as `keccak256(0x1901 ‖
/// domainSeparator ‖ keccak256(abi.encode(SAFE_MSG_TYPEHASH,
/// keccak256(abi.encode(hash)))))` and has the Safe check the owners'
/// signatures of it (`checkSignatures`), so `owners` must reach the Safe's
/// threshold.
pub fn safe_message_signature(
    safe: Address,
    chain_id: u64,
    hash: B256,
    owners: &[PrivateKeySigner],
) -> anyhow::Result<Bytes> {
    use alloy::sol_types::{SolStruct, eip712_domain};
    let domain = eip712_domain! {
        chain_id: chain_id,
        verifying_contract: safe,
    };
    let safe_message = SafeMessage {
        message: hash.to_vec().into(),
    }
    .eip712_signing_hash(&domain);
    owner_signatures(safe_message, owners)
}

/// Creation code followed by the ABI-encoded constructor arguments, checked
/// against the artifact's constructor.
fn with_constructor_args(artifact: &Artifact, args: &[DynSolValue]) -> anyhow::Result<Bytes> {
    let constructor = artifact
        .abi
        .constructor
        .as_ref()
        .context("the artifact has no constructor")?;
    let encoded = constructor
        .abi_encode_input(args)
        .context("constructor arguments do not match the ABI")?;
    let mut code = artifact.bytecode.to_vec();
    code.extend_from_slice(&encoded);
    Ok(code.into())
}
