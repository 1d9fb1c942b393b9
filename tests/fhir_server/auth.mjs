// Optional SMART authorization for the test server (off unless AUTH_ISSUER is set): the FHIR server then
// trusts only access tokens that authorization server signed (JWT access tokens, checked against its JWKS)
// for this server's audience, and only for what their scopes cover.
//
//  - GET /.well-known/smart-configuration: the issuer's endpoints, as SMART App Launch 2.x asks;
//  - no token, a bad signature, another issuer or audience, an expired token -> 401 + OperationOutcome +
//    `WWW-Authenticate: Bearer error="invalid_token"`;
//  - scopes that do not cover the interaction -> 403. SMART v2 (`system/Observation.crus`, `*` for any type)
//    and v1 (`.read` = rs, `.write` = cud, `.*`) scopes; `system/`, `user/` and `patient/` are treated alike
//    (no patient-compartment check). Each entry of a batch or transaction is checked.
//
// Env: AUTH_ISSUER (the authorization server's issuer URL), AUTH_AUDIENCE (default: this server's base URL).
import crypto from 'node:crypto';

const ALGORITHMS = { RS256: 'sha256', RS384: 'sha384', RS512: 'sha512', ES256: 'sha256', ES384: 'sha384', PS256: 'sha256' };
const V1 = { read: 'rs', write: 'cud', '*': 'cruds' };

const b64json = (part) => JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));

function outcome(code, text) {
  return { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code, diagnostics: text }] };
}

export class Auth {
  constructor(issuer, audience) {
    this.issuer = issuer.replace(/\/$/, '');
    this.audience = audience;
    this.keys = new Map();
  }

  async discover() {
    const answer = await fetch(`${this.issuer}/.well-known/openid-configuration`);
    this.metadata = await answer.json();
    await this.loadKeys();
  }

  async loadKeys() {
    const { keys } = await (await fetch(this.metadata.jwks_uri)).json();
    this.keys = new Map(keys.map((jwk) => [jwk.kid, crypto.createPublicKey({ key: jwk, format: 'jwk' })]));
  }

  smartConfiguration() {
    const m = this.metadata;
    return {
      issuer: m.issuer, jwks_uri: m.jwks_uri, token_endpoint: m.token_endpoint,
      authorization_endpoint: m.authorization_endpoint, introspection_endpoint: m.introspection_endpoint,
      grant_types_supported: ['authorization_code', 'client_credentials'],
      token_endpoint_auth_methods_supported: ['private_key_jwt'],
      token_endpoint_auth_signing_alg_values_supported: ['RS384', 'ES384'],
      scopes_supported: ['openid', 'fhirUser', 'launch', 'system/*.cruds', 'patient/*.rs'],
      response_types_supported: ['code'], code_challenge_methods_supported: ['S256'],
      capabilities: ['launch-ehr', 'client-public', 'client-confidential-asymmetric', 'context-ehr-patient',
        'permission-v1', 'permission-v2', 'sso-openid-connect'],
    };
  }

  // The token's claims, or a reason it is refused.
  async verify(token, audience) {
    const parts = token.split('.');
    if (parts.length !== 3) return { error: 'the access token is not a JWT' };
    let header;
    let claims;
    try {
      [header, claims] = [b64json(parts[0]), b64json(parts[1])];
    } catch {
      return { error: 'the access token is not a JWT' };
    }
    const digest = ALGORITHMS[header.alg];
    if (!digest) return { error: `unsupported signing algorithm ${header.alg}` };
    if (!this.keys.has(header.kid)) await this.loadKeys(); // the issuer may have rotated its keys
    const key = this.keys.get(header.kid);
    if (!key) return { error: 'the access token was not signed by a key of the trusted issuer' };
    const options = header.alg.startsWith('ES') ? { key, dsaEncoding: 'ieee-p1363' }
      : header.alg.startsWith('PS') ? { key, padding: crypto.constants.RSA_PKCS1_PSS_PADDING } : key;
    const signed = Buffer.from(`${parts[0]}.${parts[1]}`);
    if (!crypto.verify(digest, signed, options, Buffer.from(parts[2], 'base64url'))) {
      return { error: 'the access token signature is invalid' };
    }
    const now = Date.now() / 1000;
    if (claims.iss !== this.metadata.issuer) return { error: 'the access token is from another issuer' };
    const audiences = Array.isArray(claims.aud) ? claims.aud : [claims.aud];
    if (!audiences.includes(audience)) return { error: 'the access token is not for this server (aud)' };
    if (typeof claims.exp !== 'number' || claims.exp <= now) return { error: 'the access token has expired' };
    if (typeof claims.nbf === 'number' && claims.nbf > now + 5) return { error: 'the access token is not valid yet' };
    return { claims };
  }

  // null when allowed; else {status, outcome, headers}.
  async check(req, url, body, baseUrl) {
    const match = /^Bearer\s+(\S+)$/i.exec(req.headers.authorization ?? '');
    if (!match) return refusal(401, 'login', 'An access token is required (Authorization: Bearer)', 'invalid_request');
    const { claims, error } = await this.verify(match[1], this.audience ?? baseUrl);
    if (error) return refusal(401, 'login', `The access token was refused: ${error}`, 'invalid_token');
    const granted = grantedPermissions(String(claims.scope ?? ''));
    for (const [type, letter] of needed(req.method, url, body)) {
      if (!(granted.get(type) ?? '').includes(letter) && !(granted.get('*') ?? '').includes(letter)) {
        const text = `The access token's scopes do not allow this: ${type}.${letter} is needed`;
        return refusal(403, 'forbidden', text, 'insufficient_scope');
      }
    }
    return null;
  }
}

function refusal(status, code, text, error) {
  const description = text.replace(/"/g, "'");
  return { status, outcome: outcome(code, text),
    headers: { 'WWW-Authenticate': `Bearer realm="fhir", error="${error}", error_description="${description}"` } };
}

// resource type -> the permission letters (c r u d s) the scopes grant.
function grantedPermissions(scope) {
  const granted = new Map();
  for (const item of scope.split(' ')) {
    const found = /^(?:system|user|patient)\/([A-Za-z]+|\*)\.([a-z*]+)(?:\?.*)?$/.exec(item);
    if (!found) continue;
    const [, type, rights] = found;
    const letters = V1[rights] ?? (/^c?r?u?d?s?$/.test(rights) ? rights : '');
    granted.set(type, (granted.get(type) ?? '') + letters);
  }
  return granted;
}

// [resource type, letter] pairs the request needs.
function needed(method, url, body) {
  const path = url.pathname.replace(/^\/+/, '');
  if (method === 'POST' && path === '' && body?.resourceType === 'Bundle') {
    return (body.entry ?? []).flatMap((entry) => {
      const request = entry?.request ?? {};
      const inner = new URL(String(request.url ?? ''), 'http://x/');
      return needed(String(request.method ?? 'GET').toUpperCase(), inner, undefined);
    });
  }
  const [type, id] = path.split('/');
  if (!type) return url.searchParams.has('_getpages') ? [] : [['*', 's']]; // a next page: its search was checked
  if (method === 'GET') return [[type, id ? 'r' : 's']];
  if (method === 'POST') return [[type, id === '_search' ? 's' : 'c']];
  if (method === 'PUT' || method === 'PATCH') return [[type, 'u']];
  if (method === 'DELETE') return [[type, 'd']];
  return [[type, 'r']];
}
