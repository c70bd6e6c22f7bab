// Runs the official Phala Cloud SDK (@phala/cloud, pinned in package.json)
// against a Phala Cloud API and checks that every answer parses with the
// SDK's own zod schemas. Used by tests/api/conformance.rs against the
// simulator.
//
//   node tests/clients/phala_sdk.mjs <plan.json>
//
// The plan names what to ask for (see `Plan` in tests/api/conformance.rs):
// base_url, api_key, CVM ids, app ids and a Cloud-KMS source to replicate
// through the SDK's own actions, and `values`: answers the caller fetched
// itself (commit answers, for instance) with the exported schema each must
// parse with. Prints one JSON line per check, `{"check", "ok", "issues"?}`,
// and exits 1 when any check failed.

import { readFileSync } from "node:fs";
import * as sdk from "@phala/cloud";

const plan = JSON.parse(readFileSync(process.argv[2], "utf8"));
let failed = 0;

function report(check, result) {
  const line = { check, ok: result.success };
  if (!result.success) {
    failed += 1;
    line.issues = result.error?.issues ?? result.error?.message ?? String(result.error);
    line.status = result.error?.status;
  }
  console.log(JSON.stringify(line));
  return result.success ? result.data : undefined;
}

const clients = {
  "2026-01-21": sdk.createBaseClient({ apiKey: plan.api_key, baseURL: plan.base_url, version: "2026-01-21" }),
  "2025-10-28": sdk.createBaseClient({ apiKey: plan.api_key, baseURL: plan.base_url, version: "2025-10-28" }),
};

for (const [version, client] of Object.entries(clients)) {
  for (const id of plan.cvm_ids) {
    report(`getCvmInfo ${version} ${id}`, await sdk.safeGetCvmInfo(client, { id }));
  }
  for (const appId of plan.app_ids) {
    report(`getAppCvms ${version} ${appId}`, await sdk.safeGetAppCvms(client, { appId }));
  }
}

const client = clients["2026-01-21"];
report("getAvailableNodes", await sdk.safeGetAvailableNodes(client));
for (const app_id of plan.onchain_app_ids) {
  report(
    `getAppEnvEncryptPubKey ${app_id}`,
    await sdk.safeGetAppEnvEncryptPubKey(client, { kms: plan.kms_type, app_id }),
  );
}
report("getCvmStatusBatch", await sdk.safeGetCvmStatusBatch(client, { vmUuids: plan.cvm_ids }));

// The SDK's own replicate action (a Cloud-KMS source: the replica is made at once).
const replica = report(
  `replicateCvm ${plan.cloud_source}`,
  await sdk.safeReplicateCvm(client, { id: plan.cloud_source, node_id: plan.cloud_node_id }),
);
if (replica) {
  report(`getCvmInfo replica ${replica.vm_uuid}`, await sdk.safeGetCvmInfo(client, { id: replica.vm_uuid }));
}

for (const { schema, label, value } of plan.values) {
  const zodSchema = sdk[schema];
  if (!zodSchema) {
    report(`${schema} ${label}`, { success: false, error: { message: `no export ${schema}` } });
    continue;
  }
  report(`${schema} ${label}`, zodSchema.safeParse(value));
}

process.exit(failed === 0 ? 0 : 1);
