// Reads a JSON list of Istio resources on stdin and validates each against
// the schema of its apiVersion/kind (Istio's CRD schemas, compiled). Prints
// one JSON line per resource: {"kind", "name", "error"} (error null if valid).
// Exits 1 when any resource is invalid or of a kind it does not know.
import { readFileSync } from "node:fs";

const input = JSON.parse(readFileSync(0, "utf8"));
let failed = false;
for (const resource of input) {
  const [group, version] = resource.apiVersion.split("/");
  const name = resource.metadata?.name;
  let error = null;
  try {
    const module = await import(`@kubernetes-models/istio/${group}/${version}/${resource.kind}`);
    new module[resource.kind](resource).validate();
  } catch (e) {
    error = String(e.message ?? e);
  }
  failed ||= error !== null;
  console.log(JSON.stringify({ kind: resource.kind, name, error }));
}
process.exit(failed ? 1 : 0);
