// End-to-end test of Muster's web console in a real browser: Debian's chromium driven by
// playwright-core. Run by scripts/console-test.sh, which starts `muster serve` and passes:
//   MUSTER_CONNECTION  path of the server's connection.json
//   MUSTER_BIN         the muster binary (for `muster device register`)
//   MUSTER_DATA_DIR    the server's data dir (the CLI reads connection.json from it)
//   MUSTER_CONSOLE_HOST the server's loopback address (swtpm listens there too)
//   CHROMIUM           browser binary (default /usr/bin/chromium)
// The TPM test starts Debian's swtpm (package swtpm) itself and needs MUSTER_BIN built with
// `--features muster/tpm`; without either it fails saying so.
// Screenshots of every page go to tests/console/artifacts/ (git-ignored).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn, spawnSync } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect, createServer } from "node:net";
import { chromium } from "playwright-core";

const conn = JSON.parse(readFileSync(process.env.MUSTER_CONNECTION, "utf8"));
const base = conn.consoleUrl; // https://HOST:PORT/console
const owner = Object.fromEntries(
  conn.serviceConnectionString.split(";").map((kv) => {
    const i = kv.indexOf("=");
    return [kv.slice(0, i), kv.slice(i + 1)];
  }),
);
const builtInHub = conn.hubs.find((h) => h.builtIn).hostName;
const artifacts = new URL("./artifacts/", import.meta.url).pathname;
const suffix = Date.now().toString(36);
const groupId = `console-e2e-${suffix}`;
const deviceId = `e2e-dev-${suffix}`;

let context;
let page;
const dialogs = [];
let profile;
let shot = 0;

async function screenshot(name) {
  shot += 1;
  await page.screenshot({ path: join(artifacts, `${String(shot).padStart(2, "0")}-${name}.png`), fullPage: true });
}

before(async () => {
  rmSync(artifacts, { recursive: true, force: true });
  mkdirSync(artifacts, { recursive: true });
  profile = mkdtempSync(join(tmpdir(), "muster-console-chromium-"));
  context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    // The server's certificate comes from the throwaway local CA of this run, on a loopback
    // address; trusting it through the OS store would need root, so certificate errors are
    // ignored for this test only.
    ignoreHTTPSErrors: true,
  });
  page = context.pages()[0] ?? (await context.newPage());
  // Delete confirmations: accepted, and kept so tests can check what they said.
  page.on("dialog", (d) => {
    dialogs.push(d.message());
    d.accept();
  });
});

after(async () => {
  await context?.close();
  if (profile) rmSync(profile, { recursive: true, force: true });
  await stopSwtpm();
});

// ---- swtpm: a software TPM on the server's loopback address, state in a temp dir ----
let swtpm; // { child, dir, tcti }

/** Resolves with whether `port` on `host` can be bound now (then frees it). */
function canBind(host, port) {
  return new Promise((resolve) => {
    const srv = createServer();
    srv.once("error", () => resolve(false));
    srv.listen({ host, port, exclusive: true }, () => srv.close(() => resolve(true)));
  });
}

/** A free port P on `host` with P + 1 free too (the swtpm TCTI's control port is P + 1). */
async function twoFreePorts(host) {
  for (let i = 0; i < 100; i++) {
    const port = await new Promise((resolve, reject) => {
      const srv = createServer();
      srv.once("error", reject);
      srv.listen({ host, port: 0, exclusive: true }, () => {
        const p = srv.address().port;
        srv.close(() => resolve(p));
      });
    });
    if (port < 65535 && (await canBind(host, port + 1))) return port;
  }
  throw new Error(`no two consecutive free ports on ${host}`);
}

/** Resolves once `host:port` accepts a connection; rejects if `child` exits or at `deadline`. */
async function acceptsConnections(host, port, child, deadline) {
  for (;;) {
    if (child.exitCode !== null) throw new Error(`swtpm exited with ${child.exitCode}`);
    const ok = await new Promise((resolve) => {
      const s = connect({ host, port }, () => { s.destroy(); resolve(true); });
      s.once("error", () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`swtpm is not listening on ${host}:${port}`);
    await new Promise((r) => setImmediate(r));
  }
}

async function startSwtpm() {
  const probe = spawnSync("swtpm", ["--version"], { encoding: "utf8" });
  if (probe.error) {
    throw new Error("swtpm is not installed: the TPM enrollment test needs Debian's swtpm (apt-get install swtpm swtpm-tools; .ci/run installs it)");
  }
  const host = process.env.MUSTER_CONSOLE_HOST || new URL(base).hostname;
  const port = await twoFreePorts(host);
  const dir = mkdtempSync(join(tmpdir(), "muster-console-swtpm-"));
  const child = spawn("swtpm", [
    "socket", "--tpm2", "--tpmstate", `dir=${dir}`,
    "--server", `type=tcp,port=${port},bindaddr=${host}`,
    "--ctrl", `type=tcp,port=${port + 1},bindaddr=${host}`,
    "--flags", "not-need-init,startup-clear",
  ], { stdio: "ignore" });
  swtpm = { child, dir, tcti: `swtpm:host=${host},port=${port}` };
  const deadline = Date.now() + 20_000;
  await acceptsConnections(host, port, child, deadline);
  await acceptsConnections(host, port + 1, child, deadline);
}

async function stopSwtpm() {
  if (!swtpm) return;
  const { child, dir } = swtpm;
  swtpm = undefined;
  if (child.exitCode === null && child.signalCode === null) {
    const exited = new Promise((r) => child.once("exit", r));
    child.kill("SIGTERM");
    await exited;
  }
  rmSync(dir, { recursive: true, force: true });
}

test("a wrong key cannot sign in", async () => {
  await page.goto(base);
  assert.match(page.url(), /\/console\/sign-in$/);
  await page.getByLabel("Policy name").fill(owner.SharedAccessKeyName);
  await page.getByLabel("Key").fill("d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktMDA=");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByText("do not match a shared access policy").waitFor();
  assert.match(page.url(), /\/console\/sign-in$/);
  await screenshot("sign-in-refused");
});

test("sign in with the owner policy", async () => {
  await page.getByLabel("Policy name").fill(owner.SharedAccessKeyName);
  await page.getByLabel("Key").fill(owner.SharedAccessKey);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("heading", { name: "Overview" }).waitFor();
  assert.equal(await page.locator("#id-scope").textContent(), conn.idScope);
  assert.equal(await page.locator("#device-endpoint").textContent(), conn.deviceEndpoint);
  const cookies = await context.cookies();
  const session = cookies.find((c) => c.name === "muster_console");
  assert.ok(session.httpOnly && session.secure && session.sameSite === "Strict");
  await screenshot("overview");
});

let groupKey;

test("create a symmetric-key group with generated keys and read its key", async () => {
  await page.getByRole("link", { name: "Manage enrollments" }).click();
  await page.getByRole("heading", { name: "Manage enrollments" }).waitFor();
  await screenshot("enrollment-groups");
  await page.getByRole("link", { name: "Add enrollment group" }).click();
  await page.getByLabel(/Group name/).fill(groupId);
  assert.ok(await page.getByLabel("Symmetric key").isChecked());
  assert.ok(await page.getByLabel("Auto-generate keys").isChecked());
  await page.getByLabel(/Initial device twin state/).fill('{"tags": {"line": "e2e"}, "properties": {"desired": {"interval": 30}}}');
  await screenshot("add-enrollment-group");
  await page.getByRole("button", { name: "Save", exact: true }).click();
  await page.getByText(`Created enrollment group '${groupId}'.`).waitFor();
  await page.getByText("Show keys").click();
  groupKey = (await page.locator("#primary-key").textContent()).trim();
  assert.match(groupKey, /^[A-Za-z0-9+/]{86}==$/);
  assert.ok(await page.getByRole("button", { name: "Copy primary key" }).isVisible());
  await screenshot("group-settings");
  // The list shows it, and its search finds it.
  await page.goto(`${base}/enrollments?tab=groups&q=${suffix}`);
  await page.getByRole("link", { name: groupId }).waitFor();
  assert.equal(await page.locator("p.error").count(), 0);
});

test("individual enrollments tab and a failed form keeps its values", async () => {
  await page.goto(`${base}/enrollments?tab=individual`);
  await page.getByRole("link", { name: "Add individual enrollment" }).click();
  await page.getByLabel("Registration id", { exact: true }).fill("bad id!");
  await page.getByRole("button", { name: "Save", exact: true }).click();
  await page.getByText("(error 400002)").waitFor();
  assert.equal(await page.getByLabel("Registration id", { exact: true }).inputValue(), "bad id!");
  await screenshot("add-individual-refused");
});

let deviceKey;

test("compute the device key from the group key", async () => {
  await page.getByRole("link", { name: "Device key" }).click();
  await page.getByLabel("Group key (base64)").fill(groupKey);
  await page.getByLabel("Registration id").fill(deviceId);
  await page.getByRole("button", { name: "Compute" }).click();
  deviceKey = (await page.locator("#device-key").textContent()).trim();
  assert.match(deviceKey, /^[A-Za-z0-9+/]{43}=$/);
  await screenshot("device-key");
});

test("register a device with the CLI, watch it arrive live and see it on the group's registration records", async () => {
  // The overview's live view is subscribed before the device registers.
  await page.goto(base);
  await page.locator("#live-status", { hasText: "Live." }).waitFor();
  const out = execFileSync(
    process.env.MUSTER_BIN,
    ["device", "register", "--registration-id", deviceId, "--key", deviceKey, "--data-dir", process.env.MUSTER_DATA_DIR],
    { encoding: "utf8" },
  );
  assert.match(out, /assigned/);
  const live = page.locator("#live-registrations tbody tr", { hasText: deviceId });
  await live.waitFor();
  const liveCells = await live.locator("td").allTextContents();
  assert.equal(liveCells[2], "assigned");
  assert.equal(liveCells[3], builtInHub);
  await screenshot("live-registrations");
  await page.goto(`${base}/enrollments/groups/${groupId}`);
  await page.getByRole("link", { name: "Registration records" }).last().click();
  const row = page.locator("#registrations tbody tr", { hasText: deviceId });
  await row.waitFor();
  const cells = await row.locator("th, td").allTextContents();
  assert.equal(cells[0], deviceId);
  assert.equal(cells[2], "assigned");
  assert.equal(cells[3], builtInHub, "the Assigned IoT hub column");
  await screenshot("group-registration-records");
});

test("the other pages: registration records, linked hubs, hub devices", async () => {
  await page.getByRole("navigation", { name: "Main" }).getByRole("link", { name: "Registration records" }).click();
  await page.getByLabel("Status").selectOption("assigned");
  await page.getByLabel("Enrollment group").fill(groupId);
  await page.getByRole("button", { name: "Filter" }).click();
  await page.locator("tbody tr", { hasText: deviceId }).waitFor();
  await screenshot("registration-records");

  await page.getByRole("link", { name: "Linked IoT hubs" }).click();
  await page.getByRole("rowheader", { name: new RegExp(builtInHub) }).waitFor();
  await screenshot("linked-hubs");

  await page.getByRole("link", { name: "Hub devices" }).click();
  await page.getByRole("link", { name: deviceId }).click();
  await page.getByRole("heading", { name: `Device ${deviceId}` }).waitFor();
  assert.match(await page.locator("#twin").textContent(), /"line": "e2e"/);
  await screenshot("hub-device");
});

test("a TPM device: its EK enrolled through the console's form, registered with `muster device register --tpm`", async () => {
  await startSwtpm();
  // The device CLI runs with nothing from the test's environment pointing at the server: it is
  // given the ID scope, endpoint and CA as a developer would.
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("MUSTER_")));
  const muster = (args) => {
    const r = spawnSync(process.env.MUSTER_BIN, args, { encoding: "utf8", env });
    // A muster built without the `tpm` feature says so here ("built without TPM support").
    assert.equal(r.status, 0, `muster ${args.slice(0, 2).join(" ")} failed:\n${r.stderr}${r.stdout}`);
    return r.stdout;
  };
  // Developer: the EK and the registration id derived from it.
  const ek = JSON.parse(muster(["tpm", "show-ek", "--tcti", swtpm.tcti, "-o", "json"]));
  assert.match(ek.registrationId, /^[a-z2-7]{52}$/);
  const tpmDevice = `e2e-tpm-${suffix}`;

  // Groups do not offer TPM (DPS supports it for individual enrollments only).
  await page.goto(`${base}/enrollments/new?kind=groups`);
  assert.equal(await page.getByLabel("Trusted Platform Module (TPM)").count(), 0, "no TPM option on the group form");

  // Operator: the individual enrollment form, TPM, the EK pasted.
  await page.goto(`${base}/enrollments?tab=individual`);
  await page.getByRole("link", { name: "Add individual enrollment" }).click();
  await page.getByLabel("Registration id", { exact: true }).fill(ek.registrationId);
  await page.getByLabel(/IoT Hub device id/).fill(tpmDevice);
  await page.getByLabel("Trusted Platform Module (TPM)").check();
  assert.ok(await page.getByLabel(/Endorsement key/).isVisible(), "the TPM fields show");
  assert.ok(!(await page.getByLabel("Primary key (base64; ignored when auto-generating)").isVisible()), "the symmetric key fields hide");
  // A truncated paste is refused under the field, saying which check failed; the form keeps it.
  const truncated = ek.endorsementKey.slice(0, 200);
  await page.getByLabel(/Endorsement key/).fill(truncated);
  await page.getByRole("button", { name: "Save", exact: true }).click();
  await page.locator("#tpm-error", { hasText: "The endorsement key is not a TPM2B_PUBLIC: it ends early." }).waitFor();
  assert.equal(await page.getByLabel(/Endorsement key/).getAttribute("aria-invalid"), "true");
  assert.equal(await page.getByLabel(/Endorsement key/).inputValue(), truncated);
  assert.ok(await page.getByLabel("Trusted Platform Module (TPM)").isChecked());
  await screenshot("add-tpm-enrollment-refused");
  // The EK as a terminal wraps it (64 columns): accepted.
  await page.getByLabel(/Endorsement key/).fill(ek.endorsementKey.match(/.{1,64}/g).join("\n"));
  await screenshot("add-tpm-enrollment");
  await page.getByRole("button", { name: "Save", exact: true }).click();
  await page.getByText(`Created individual enrollment '${ek.registrationId}'.`).waitFor();
  assert.match(await page.locator(".meta").first().textContent(), /attestation\s+tpm/);
  await page.getByText("devices derive this registration id from it").waitFor();
  await screenshot("tpm-enrollment");

  // Developer: register with the TPM (the registration id defaults to the EK's).
  const out = JSON.parse(muster([
    "device", "register", "--tpm", "--tcti", swtpm.tcti,
    "--id-scope", conn.idScope, "--endpoint", `${conn.dpsHost}:${conn.httpsPort}`,
    "--ca-cert", conn.caCertificate, "-o", "json",
  ]));
  assert.equal(out.status, "assigned", JSON.stringify(out));
  assert.equal(out.registrationId, ek.registrationId);
  assert.equal(out.deviceId, tpmDevice);
  assert.equal(out.assignedHub, builtInHub);
  await stopSwtpm();

  // The console's registration records show the device assigned to the built-in hub.
  await page.getByRole("navigation", { name: "Main" }).getByRole("link", { name: "Registration records" }).click();
  await page.getByLabel("Search", { exact: true }).fill(ek.registrationId);
  await page.getByRole("button", { name: "Filter" }).click();
  const row = page.locator("#registrations tbody tr").filter({ has: page.getByRole("rowheader", { name: ek.registrationId, exact: true }) });
  await row.waitFor();
  const cells = await row.locator("th, td").allTextContents();
  assert.deepEqual(cells.slice(0, 4), [ek.registrationId, tpmDevice, "assigned", builtInHub]);
  await screenshot("tpm-registration-record");
});

test("issued certificates: a CSR registration's certificate is listed and revoked with a reason", async () => {
  const cli = (args) =>
    execFileSync(process.env.MUSTER_BIN, [...args, "--data-dir", process.env.MUSTER_DATA_DIR], { encoding: "utf8" });
  const certGroup = `console-certs-${suffix}`;
  const certDevice = `e2e-cert-${suffix}`;
  cli(["enrollment-group", "create", "--group-id", certGroup, "--issue-certificates", "true"]);
  const shown = JSON.parse(cli(["enrollment-group", "show", certGroup, "--show-keys", "--output", "json"]));
  const dir = mkdtempSync(join(tmpdir(), "muster-console-csr-"));
  try {
    const key = join(dir, "dev.key");
    execFileSync("openssl", ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key]);
    const out = cli([
      "device", "register", "--registration-id", certDevice,
      "--group-key", shown.attestation.symmetricKey.primaryKey, "--csr-key", key,
    ]);
    assert.match(out, /assigned/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  await page.getByRole("navigation", { name: "Main" }).getByRole("link", { name: "Issued certificates" }).click();
  await page.getByLabel("Registration ID").fill(certDevice);
  await page.getByRole("button", { name: "Filter" }).click();
  const row = page.locator("#issued-certificates tbody tr", { hasText: certDevice });
  await row.waitFor();
  const serial = (await row.locator("th").textContent()).trim();
  assert.match(serial, /^[0-9A-F]+$/);
  await screenshot("issued-certificates");
  await row.getByLabel("Reason").fill("lost in the field");
  await row.getByRole("button", { name: "Revoke" }).click(); // the confirmation is accepted
  await page.getByText(`Revoked certificate ${serial}.`).waitFor();
  const revoked = page.locator("#issued-certificates tbody tr", { hasText: serial });
  assert.match(await revoked.textContent(), /lost in the field/);
  assert.equal(await revoked.getByRole("button", { name: "Revoke" }).count(), 0);
  assert.equal(await page.locator("p.error").count(), 0);
  await screenshot("issued-certificate-revoked");
});

test("search registration records by registration id and by device id, then delete one", async () => {
  // A second device of the group, to delete.
  const second = `${deviceId}-b`;
  const secondKey = createHmac("sha256", Buffer.from(groupKey, "base64")).update(second).digest("base64");
  execFileSync(
    process.env.MUSTER_BIN,
    ["device", "register", "--registration-id", second, "--key", secondKey, "--data-dir", process.env.MUSTER_DATA_DIR],
    { encoding: "utf8" },
  );
  await page.goto(`${base}/registrations?q=${encodeURIComponent(deviceId.slice(0, 12).toUpperCase())}&by=registrationId`);
  const row = page.locator("#registrations tbody tr").filter({ has: page.getByRole("rowheader", { name: deviceId, exact: true }) });
  await row.waitFor();
  // Relative time with the exact UTC time on hover, whole seconds.
  const time = row.locator("time");
  assert.match(await time.textContent(), /just now|seconds? ago|minutes? ago/);
  assert.match(await time.getAttribute("title"), /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$/);
  await screenshot("registration-search");
  await page.getByLabel("Search", { exact: true }).fill(deviceId);
  await page.getByLabel("by", { exact: true }).selectOption("deviceId");
  await page.getByRole("button", { name: "Filter" }).click();
  await row.waitFor();
  assert.equal(await page.locator("#registrations tbody tr").count(), 2, "both devices start with the searched id");
  await page.goto(`${base}/registrations?q=no-such-device-${suffix}&by=deviceId`);
  await page.getByText("No registration record matches.").waitFor();

  // Delete the second record with its hub device; the confirmation says exactly that.
  await page.goto(`${base}/registrations?q=${second}`);
  await page.getByRole("button", { name: `Delete record and device ${second}` }).click();
  await page.getByText(`Deleted the registration record of '${second}' and 1 device(s) in its IoT hub.`).waitFor();
  assert.match(dialogs.at(-1), new RegExp(`removes 1 registration record and 1 device \\(${second}\\) from IoT hub ${builtInHub.replace(/\./g, "\\.")}`));
  assert.match(page.url(), new RegExp(`q=${second}`), "back on the same search");
  await page.getByText("No registration record matches.").waitFor();
  await page.goto(`${base}/hub/devices`);
  assert.equal(await page.getByRole("link", { name: second, exact: true }).count(), 0, "its hub device is gone");
});

test("the IoT Edge toggle, CA certificates, access policies and the default allocation policy", async () => {
  await page.goto(`${base}/enrollments/groups/${groupId}`);
  await page.getByLabel("IoT Edge device").check();
  await page.getByRole("button", { name: "Save settings" }).click();
  await page.goto(`${base}/enrollments/groups/${groupId}`);
  assert.ok(await page.getByLabel("IoT Edge device").isChecked(), "the toggle is saved");

  await page.getByRole("link", { name: "CA certificates" }).click();
  await page.getByRole("heading", { name: "CA certificates" }).waitFor();
  // A CA of our own (openssl), so the test can sign the verification certificate.
  const caDir = mkdtempSync(join(tmpdir(), "muster-console-ca-"));
  const ossl = (...args) => execFileSync("openssl", args, { cwd: caDir, stdio: ["ignore", "pipe", "pipe"] });
  ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key",
    "-out", "ca.pem", "-days", "2", "-subj", `/CN=e2e-ca-${suffix}`,
    "-addext", "basicConstraints=critical,CA:true", "-addext", "keyUsage=critical,keyCertSign,cRLSign");
  const caName = `e2e-ca-${suffix}`;
  await page.getByLabel("Certificate name").fill(caName);
  await page.getByLabel("Certificate (PEM)").fill(readFileSync(join(caDir, "ca.pem"), "utf8"));
  await page.getByRole("button", { name: "Upload" }).click();
  await page.getByText(`Uploaded CA certificate '${caName}'.`).waitFor();
  const caRow = page.locator("#ca-certificates tbody tr", { hasText: caName });
  assert.match(await caRow.textContent(), /unverified/);
  assert.equal(await caRow.locator("time").textContent(), "in 2 days", "the CA expires in two days");
  // A wrong proof is refused with the API's reason, and nothing changes.
  await page.getByRole("button", { name: `Generate verification code for ${caName}` }).click();
  const code = (await page.locator("#verification-code").textContent()).trim();
  assert.match(code, /^[0-9A-F]{48}$/);
  await page.getByLabel(`Verification certificate (PEM) for ${caName}`).fill(readFileSync(join(caDir, "ca.pem"), "utf8"));
  await page.getByRole("button", { name: `Verify ${caName}` }).click();
  await page.locator("#form-error").waitFor();
  assert.match(await caRow.textContent(), /unverified/);
  // The proof: a certificate whose CN is the code, signed by the CA's key.
  await page.getByRole("button", { name: `Generate verification code for ${caName}` }).click();
  const code2 = (await page.locator("#verification-code").textContent()).trim();
  ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "proof.key", "-out", "proof.csr", "-subj", `/CN=${code2}`);
  ossl("x509", "-req", "-in", "proof.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "proof.pem", "-days", "1");
  await page.getByLabel(`Verification certificate (PEM) for ${caName}`).fill(readFileSync(join(caDir, "proof.pem"), "utf8"));
  await page.getByRole("button", { name: `Verify ${caName}` }).click();
  await page.getByText(`Verified CA certificate '${caName}'`).waitFor();
  assert.match(await caRow.textContent(), /verified/);
  assert.doesNotMatch(await caRow.textContent(), /unverified/);
  rmSync(caDir, { recursive: true, force: true });
  await screenshot("ca-certificates");

  await page.getByRole("link", { name: "Access policies" }).click();
  await page.getByLabel("Policy name").fill(`reader-${suffix}`);
  await page.locator("#new-EnrollmentRead").check();
  await page.locator("#new-RegistrationStatusRead").check();
  await page.getByRole("button", { name: "Add policy" }).click();
  readerKey = (await page.locator("#primary-key").textContent()).trim();
  assert.match(readerKey, /^[A-Za-z0-9+/]{43}=$/);
  await page.getByRole("button", { name: `Regenerate secondary key of reader-${suffix}` }).click();
  await page.getByText(`Regenerated the secondary key of 'reader-${suffix}'`).waitFor();
  assert.equal((await page.locator("#primary-key").textContent()).trim(), readerKey, "the primary key stays");
  await screenshot("access-policies");

  await page.getByRole("link", { name: "Allocation policy" }).click();
  await page.getByLabel(/Static configuration/).check();
  await page.getByRole("button", { name: "Save" }).click();
  await page.getByText("Saved: enrollments without their own policy now use static.").waitFor();
  assert.ok(await page.getByLabel(/Static configuration/).isChecked());
  await page.getByLabel(/Evenly weighted/).check();
  await page.getByRole("button", { name: "Save" }).click();
  await screenshot("allocation-policy");
});

let readerKey;

test("a form posted without the CSRF token is refused", async () => {
  const r = await page.request.post(`${base}/enrollments/new`, {
    form: { kind: "groups", id: "no-csrf-token", attestation: "symmetricKey", auto_keys: "1" },
    maxRedirects: 0,
  });
  assert.equal(r.status(), 403);
  assert.match(await r.text(), /CSRF check failed/);
  await page.goto(`${base}/enrollments?tab=groups&q=no-csrf-token`);
  await page.getByText("None yet.").waitFor();
  assert.equal(await page.locator("p.error").count(), 0);
});

test("disable the group, then delete it with its records", async () => {
  await page.goto(`${base}/enrollments/groups/${groupId}`);
  await page.getByRole("button", { name: "Disable this enrollment group" }).click();
  await page.getByText("The enrollment group is now disabled.").waitFor();
  assert.equal(await page.locator("#provisioning-status").textContent(), "disabled");
  await screenshot("group-disabled");
  assert.equal(await page.locator("#cascade-counts").textContent(), "1 registration record and 1 device in their IoT hubs");
  await page.getByLabel(/Also delete its 1 registration record/).check();
  await page.getByRole("button", { name: "Delete enrollment group" }).click();
  await page.getByText(`Deleted enrollment group '${groupId}'.`).waitFor();
  await page.getByText("1 registration record(s) and 1 device(s) in their hubs deleted.").waitFor();
  assert.equal(dialogs.at(-1), `Delete enrollment group ${groupId} and 1 registration record and 1 device in their IoT hubs?`);
  assert.equal(await page.getByRole("link", { name: groupId }).count(), 0);
  assert.equal(await page.locator("p.error").count(), 0);
  await screenshot("group-deleted");
});

test("the audit log shows the console's writes", async () => {
  await page.getByRole("link", { name: "Audit log" }).click();
  await page.getByLabel("Affected id").fill(groupId);
  await page.getByRole("button", { name: "Filter" }).click();
  const row = page.locator("#audit-entries tbody tr", { hasText: "DELETE" });
  await row.waitFor();
  const cells = await row.locator("th, td").allTextContents();
  assert.deepEqual(cells.slice(1, 8), [owner.SharedAccessKeyName, "console", "DELETE", "/enrollmentGroups/{id}", groupId, "204", ""]);
  await screenshot("audit-log");
});

test("at 390 px wide no page overflows horizontally", async () => {
  await page.setViewportSize({ width: 390, height: 844 });
  for (const path of ["", "/enrollments", `/enrollments/groups/${groupId}`, "/registrations", "/linked-hubs", "/ca-certificates", "/access-policies", "/settings", "/audit"]) {
    await page.goto(`${base}${path}`);
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
    assert.ok(overflow <= 0, `${path || "/"} overflows by ${overflow} px`);
  }
  await page.goto(`${base}/registrations`);
  await screenshot("registrations-390px");
  await page.setViewportSize({ width: 1280, height: 800 });
});

test("sign out", async () => {
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.getByText("You are signed out.").waitFor();
  await page.goto(base);
  assert.match(page.url(), /\/console\/sign-in$/);
});

test("a read-only policy sees disabled controls naming the right it lacks", async () => {
  await page.getByLabel("Policy name").fill(`reader-${suffix}`);
  await page.getByLabel("Key").fill(readerKey);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("heading", { name: "Overview" }).waitFor();
  await page.goto(`${base}/registrations`);
  await page.locator("#delete-needs", { hasText: "needs RegistrationStatusWrite" }).waitFor();
  await page.goto(`${base}/enrollments`);
  await page.getByText("Adding enrollments needs EnrollmentWrite").waitFor();
  assert.equal(await page.getByRole("link", { name: /^Add enrollment/ }).count(), 0, "no add link");
  await screenshot("read-only-enrollments");
  await page.goto(`${base}/settings`);
  const save = page.getByRole("button", { name: "Save" });
  assert.ok(await save.isDisabled());
  assert.equal(await save.getAttribute("title"), "needs ServiceConfig");
  // The refusal is at the top of the page, above the form.
  const alert = page.locator("p.error[role=alert]").first();
  assert.match(await alert.textContent(), /ServiceConfig/);
  const [alertY, formY] = [await alert.boundingBox(), await page.locator("form.stack").boundingBox()];
  assert.ok(alertY.y < formY.y, "the 403 is shown above the form");
  await screenshot("read-only-settings");
  await page.getByRole("button", { name: "Sign out" }).click();
});
