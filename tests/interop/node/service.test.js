// azure-iot-provisioning-service 1.11.2 (api-version 2021-10-01) against Muster.
//
// Run through the server wrapper, which starts Muster on a fresh data dir and
// passes MUSTER_CONNECTION_STRING / MUSTER_CA_CERT and NODE_EXTRA_CA_CERTS
// (Node reads the latter only at process start, so it can't be set from here):
//
//   .interop/venv/bin/python tests/interop/muster_server.py -- \
//       node --test tests/interop/node/
//
// All tests in this file share that one server; every test uses its own ids and
// asserts only about its own records.
'use strict';

const { test, describe } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const fs = require('node:fs');
const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');

const CONNECTION_STRING = process.env.MUSTER_CONNECTION_STRING;
const CA_CERT = process.env.MUSTER_CA_CERT;
if (!CONNECTION_STRING || !CA_CERT) {
  throw new Error(
    'MUSTER_CONNECTION_STRING / MUSTER_CA_CERT are not set: run these tests through ' +
    'tests/interop/muster_server.py (see tests/interop/README.md)'
  );
}

const client = ProvisioningServiceClient.fromConnectionString(CONNECTION_STRING);
const SELECT_ALL = { query: 'SELECT *' };

function unique(prefix) {
  return `${prefix}-${crypto.randomBytes(5).toString('hex')}`;
}

function assertGeneratedKey(key) {
  assert.equal(typeof key, 'string', `key is ${key}`);
  assert.equal(key.length, 88, `generated key has ${key.length} chars: ${key}`);
  assert.match(key, /^[A-Za-z0-9+/]+={0,2}$/);
  assert.equal(Buffer.from(key, 'base64').length, 64);
}

function assertNoKeys(attestation, where) {
  assert.equal(attestation.type, 'symmetricKey');
  assert.ok(!('symmetricKey' in attestation) || !attestation.symmetricKey ||
    (!attestation.symmetricKey.primaryKey && !attestation.symmetricKey.secondaryKey),
  `${where} leaked symmetric keys: ${JSON.stringify(attestation)}`);
}

// Run `fn`, expect it to reject with an HTTP error of `status`; return the error.
async function expectHttpError(status, fn) {
  let err;
  try {
    await fn();
  } catch (e) {
    err = e;
  }
  assert.ok(err, `expected HTTP ${status}, but the call succeeded`);
  assert.ok(err.response, `expected an HTTP error, got ${err && err.stack}`);
  assert.equal(err.response.statusCode, status,
    `expected HTTP ${status}, got ${err.response.statusCode}: ${err.responseBody}`);
  return err;
}

// runBulkEnrollmentOperation in 1.11.2 only ever calls back when the caller
// passes a callback (`if (callback) { _callback(...) }`), so its promise form
// never settles: use the callback form.
function runBulk(operation) {
  return new Promise((resolve, reject) => {
    client.runBulkEnrollmentOperation(operation, (err, result, response) => {
      if (err) {
        err.message += ` (HTTP ${err.response && err.response.statusCode}: ${err.responseBody})`;
        reject(err);
      }
      else resolve({ responseBody: result, httpResponse: response });
    });
  });
}

// Drain a Query, returning its pages.
async function allPages(query) {
  const pages = [];
  for (let i = 0; query.hasMoreResults; i++) {
    assert.ok(i < 1000, 'query did not terminate');
    // Pass the token explicitly: Query.next() with no argument (promise form)
    // sends no continuation token and restarts from the first page.
    const { responseBody, httpResponse } = await query.next(query.continuationToken);
    assert.ok(Array.isArray(responseBody), `page is not an array: ${JSON.stringify(responseBody)}`);
    assert.ok(httpResponse.headers['x-ms-item-type'], 'x-ms-item-type header missing');
    pages.push(responseBody);
  }
  return pages;
}

describe('individual enrollments', () => {
  test('create (symmetric key) returns generated keys; get/update/attestation/delete', async () => {
    const id = unique('node-sym');
    const twin = { tags: { env: 'node' }, properties: { desired: { interval: 10 } } };
    const { responseBody: created, httpResponse } = await client.createOrUpdateIndividualEnrollment({
      registrationId: id,
      attestation: { type: 'symmetricKey' },
      initialTwin: twin,
    });
    assert.equal(httpResponse.statusCode, 200);
    assert.equal(created.registrationId, id);
    assertGeneratedKey(created.attestation.symmetricKey.primaryKey);
    assertGeneratedKey(created.attestation.symmetricKey.secondaryKey);
    assert.equal(created.provisioningStatus, 'enabled');
    assert.deepEqual(created.initialTwin, twin);
    assert.ok(created.etag);

    const { responseBody: got } = await client.getIndividualEnrollment(id);
    assert.equal(got.registrationId, id);
    assertNoKeys(got.attestation, 'GET');
    assert.deepEqual(got.registrationState, { registrationId: id, status: 'unassigned' });
    assert.equal(got.etag, created.etag);

    const { responseBody: att } = await client.getIndividualEnrollmentAttestationMechanism(id);
    assert.deepEqual(att.symmetricKey, created.attestation.symmetricKey);

    // Update with etag: Node sends If-Match from the object's etag property.
    got.provisioningStatus = 'disabled';
    const { responseBody: updated } = await client.createOrUpdateIndividualEnrollment(got);
    assert.equal(updated.provisioningStatus, 'disabled');
    assert.notEqual(updated.etag, created.etag);
    const { responseBody: att2 } = await client.getIndividualEnrollmentAttestationMechanism(id);
    assert.deepEqual(att2.symmetricKey, created.attestation.symmetricKey, 'update must keep keys');

    // Stale etag -> 412 (InvalidEtagError); no etag over existing -> 409.
    const e412 = await expectHttpError(412, () =>
      client.createOrUpdateIndividualEnrollment({ ...got, etag: created.etag }));
    assert.equal(e412.constructor.name, 'InvalidEtagError');
    await expectHttpError(409, () =>
      client.createOrUpdateIndividualEnrollment({ registrationId: id, attestation: { type: 'symmetricKey' } }));

    // Delete with a stale etag -> 412; by id with the current one -> ok.
    await expectHttpError(412, () => client.deleteIndividualEnrollment(id, created.etag));
    await client.deleteIndividualEnrollment(id, updated.etag);
    await expectHttpError(404, () => client.getIndividualEnrollment(id));
  });

  // Checks the paged query over `ids`: all pages but the last hold exactly 10.
  async function checkPagedQuery(ids) {
    const pages = await allPages(client.createIndividualEnrollmentQuery(SELECT_ALL, 10));
    const sizes = pages.map((p) => p.length);
    assert.ok(sizes.length >= Math.ceil(ids.length / 10), `page sizes ${sizes}`);
    sizes.slice(0, -1).forEach((s) => assert.equal(s, 10, `page sizes ${sizes}`));
    assert.ok(sizes[sizes.length - 1] >= 1 && sizes[sizes.length - 1] <= 10, `page sizes ${sizes}`);
    const seen = pages.flat().map((e) => e.registrationId);
    for (const id of ids) {
      const n = seen.filter((s) => s === id).length;
      assert.equal(n, 1, `${id} seen ${n} times`);
    }
    assert.equal(new Set(seen).size, seen.length, 'an enrollment came back twice');
    pages.flat().filter((e) => ids.includes(e.registrationId))
      .forEach((e) => assertNoKeys(e.attestation, 'query'));
  }

  test('runBulkEnrollmentOperation: create 25, query with page size 10, delete', async () => {
    const ids = Array.from({ length: 25 }, (_, n) => unique(`node-bulk-${String(n).padStart(2, '0')}`));
    const enrollments = ids.map((registrationId) => ({ registrationId, attestation: { type: 'symmetricKey' } }));
    const { responseBody: result } = await runBulk({ mode: 'create', enrollments });
    assert.equal(result.isSuccessful, true, JSON.stringify(result));
    assert.deepEqual(result.errors || [], []);

    await checkPagedQuery(ids);

    const { responseBody: del } = await runBulk({ mode: 'delete', enrollments });
    assert.equal(del.isSuccessful, true, JSON.stringify(del));
    const after = (await allPages(client.createIndividualEnrollmentQuery(SELECT_ALL, 10))).flat();
    assert.deepEqual(after.filter((e) => ids.includes(e.registrationId)), []);
  });

  test('query with page size 10 across pages (enrollments created one by one)', async () => {
    const ids = Array.from({ length: 23 }, (_, n) => unique(`node-page-${String(n).padStart(2, '0')}`));
    for (const registrationId of ids) {
      await client.createOrUpdateIndividualEnrollment({ registrationId, attestation: { type: 'symmetricKey' } });
    }
    await checkPagedQuery(ids);
    for (const id of ids) {
      await client.deleteIndividualEnrollment(id);
    }
  });
});

describe('enrollment groups', () => {
  test('symmetric key group: create, get, attestation (lower-case path), query, delete', async () => {
    const id = unique('node-group');
    const { responseBody: created } = await client.createOrUpdateEnrollmentGroup({
      enrollmentGroupId: id,
      attestation: { type: 'symmetricKey' },
    });
    assert.equal(created.enrollmentGroupId, id);
    assertGeneratedKey(created.attestation.symmetricKey.primaryKey);
    assertGeneratedKey(created.attestation.symmetricKey.secondaryKey);

    const { responseBody: got } = await client.getEnrollmentGroup(id);
    assertNoKeys(got.attestation, 'group GET');
    assert.equal(got.registrationState, undefined);

    // POST /enrollmentgroups/{id}/attestationmechanism (lower-case "g")
    const { responseBody: att } = await client.getEnrollmentGroupAttestationMechanism(id);
    assert.deepEqual(att.symmetricKey, created.attestation.symmetricKey);

    const groups = (await allPages(client.createEnrollmentGroupQuery(SELECT_ALL, 10))).flat();
    assert.equal(groups.filter((g) => g.enrollmentGroupId === id).length, 1);

    const regs = await allPages(client.createEnrollmentGroupDeviceRegistrationStateQuery(SELECT_ALL, id));
    assert.deepEqual(regs.flat(), []);

    await client.deleteEnrollmentGroup(id);
    await expectHttpError(404, () => client.getEnrollmentGroup(id));
    await expectHttpError(404, () => client.getEnrollmentGroupAttestationMechanism(id));
  });

  test('x509 group with a signing certificate: info computed from the certificate', async () => {
    const id = unique('node-x509-group');
    const pem = fs.readFileSync(CA_CERT, 'utf8');
    const cert = new crypto.X509Certificate(pem);
    const { responseBody: created } = await client.createOrUpdateEnrollmentGroup({
      enrollmentGroupId: id,
      attestation: { type: 'x509', x509: { signingCertificates: { primary: { certificate: pem } } } },
    });
    const info = created.attestation.x509.signingCertificates.primary.info;
    assert.equal(info.sha256Thumbprint, cert.fingerprint256.replace(/:/g, '').toUpperCase());
    assert.equal(info.sha1Thumbprint, cert.fingerprint.replace(/:/g, '').toUpperCase());
    const rdns = cert.subject.split('\n');
    const cn = rdns.find((r) => r.startsWith('CN='));
    if (rdns.length === 1) {
      assert.equal(info.subjectName, cn);
    } else {
      assert.ok(info.subjectName.includes(cn), `subjectName ${info.subjectName} lacks ${cn}`);
    }
    assert.equal(BigInt('0x' + info.serialNumber), BigInt('0x' + cert.serialNumber));
    assert.ok(!created.attestation.x509.signingCertificates.primary.certificate);

    const { responseBody: att } = await client.getEnrollmentGroupAttestationMechanism(id);
    assert.equal(att.x509.signingCertificates.primary.info.sha256Thumbprint, info.sha256Thumbprint);
    await client.deleteEnrollmentGroup(created); // object form: If-Match from its etag
    await expectHttpError(404, () => client.getEnrollmentGroup(id));
  });
});

describe('registration states and auth', () => {
  test('getDeviceRegistrationState of an unknown id is 404', async () => {
    await expectHttpError(404, () => client.getDeviceRegistrationState(unique('never-registered')));
  });

  test('a wrong key is rejected with 401', async () => {
    const wrongKey = crypto.randomBytes(32).toString('base64');
    const bad = ProvisioningServiceClient.fromConnectionString(
      CONNECTION_STRING.replace(/SharedAccessKey=[^;]*/, `SharedAccessKey=${wrongKey}`));
    const id = unique('node-unauth');
    const err = await expectHttpError(401, () =>
      bad.createOrUpdateIndividualEnrollment({ registrationId: id, attestation: { type: 'symmetricKey' } }));
    assert.equal(err.constructor.name, 'UnauthorizedError');
    await expectHttpError(404, () => client.getIndividualEnrollment(id));
  });
});
