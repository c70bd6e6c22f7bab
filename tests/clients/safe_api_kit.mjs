// Runs Safe's official Transaction Service client (@safe-global/api-kit,
// pinned in package.json) against a Transaction Service. Used by
// tests/api/conformance.rs against the simulator, with a real Safe on anvil.
//
//   node tests/clients/safe_api_kit.mjs propose <plan.json>
//   node tests/clients/safe_api_kit.mjs executed <plan.json>
//
// `propose`: the first owner proposes the plan's call with api-kit's next
// nonce and protocol-kit's Safe transaction hash, the second owner confirms,
// and the pending list is read back. `executed` (after the caller executed
// it on chain): reads the transaction and the lists again. Both print one
// JSON object with what api-kit returned; the Rust test asserts on it.

import { readFileSync } from "node:fs";
import SafeApiKit from "@safe-global/api-kit";
import { calculateSafeTransactionHash } from "@safe-global/protocol-kit";
import { privateKeyToAccount } from "viem/accounts";

const [phase, planPath] = process.argv.slice(2);
const plan = JSON.parse(readFileSync(planPath, "utf8"));
const ApiKit = SafeApiKit.default ?? SafeApiKit;
const apiKit = new ApiKit({ chainId: BigInt(plan.chain_id), txServiceUrl: plan.tx_service_url });
const owners = plan.owner_keys.map((key) => privateKeyToAccount(key));

async function attempt(label, action) {
  try {
    return { ok: true, value: await action() };
  } catch (error) {
    return { ok: false, label, status: error.statusCode, message: String(error.message ?? error), data: error.data };
  }
}

const out = {};
if (phase === "propose") {
  out.about = await attempt("about", () => apiKit.getServiceInfo());
  out.safe_info = await attempt("safe info", () => apiKit.getSafeInfo(plan.safe));
  out.next_nonce = await attempt("next nonce", () => apiKit.getNextNonce(plan.safe));
  const safeTransactionData = {
    to: plan.to,
    value: "0",
    data: plan.data,
    operation: 0,
    safeTxGas: "0",
    baseGas: "0",
    gasPrice: "0",
    gasToken: "0x0000000000000000000000000000000000000000",
    refundReceiver: "0x0000000000000000000000000000000000000000",
    nonce: Number(out.next_nonce.value),
  };
  const safeTxHash = calculateSafeTransactionHash(plan.safe, safeTransactionData, plan.safe_version, BigInt(plan.chain_id));
  out.safe_tx_hash = safeTxHash;
  const [first, second] = owners;
  out.propose = await attempt("propose", async () =>
    apiKit.proposeTransaction({
      safeAddress: plan.safe,
      safeTransactionData,
      safeTxHash,
      senderAddress: first.address,
      senderSignature: await first.sign({ hash: safeTxHash }),
      origin: "approval-bridge conformance test",
    }),
  );
  out.after_propose = await attempt("get", () => apiKit.getTransaction(safeTxHash));
  out.confirm = await attempt("confirm", async () =>
    apiKit.confirmTransaction(safeTxHash, await second.sign({ hash: safeTxHash })),
  );
  out.transaction = await attempt("get", () => apiKit.getTransaction(safeTxHash));
  out.confirmations = await attempt("confirmations", () => apiKit.getTransactionConfirmations(safeTxHash));
  out.pending = await attempt("pending", () => apiKit.getPendingTransactions(plan.safe));
} else if (phase === "executed") {
  out.transaction = await attempt("get", () => apiKit.getTransaction(plan.safe_tx_hash));
  out.pending = await attempt("pending", () => apiKit.getPendingTransactions(plan.safe));
  out.history = await attempt("history", () => apiKit.getMultisigTransactions(plan.safe, { executed: true }));
  out.safe_info = await attempt("safe info", () => apiKit.getSafeInfo(plan.safe));
} else {
  console.error(`unknown phase ${phase}`);
  process.exit(2);
}
console.log(JSON.stringify(out));
