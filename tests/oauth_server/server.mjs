// A real OAuth 2.0 / OpenID Connect authorization server for the SMART tests: oidc-provider on node:http,
// 127.0.0.1. It plays the EHR's authorization server: SMART Backend Services (client_credentials with a
// private_key_jwt client assertion) and SMART App Launch (authorization code + PKCE, `launch` and `aud`).
// Access tokens are JWTs (RFC 9068) for one resource server, the FHIR server (`AUDIENCE`), thanks to
// resource indicators; the FHIR server checks them against this server's JWKS.
//
// Env: PORT (0 = any free port; the issuer `http://127.0.0.1:PORT` is printed), AUDIENCE (the FHIR server's
// base URL), TOKEN_TTL (seconds, default 300), CONFIG (JSON: {"clients": [oidc-provider client metadata,
// each with `jwks`, `scope` (the scopes it may be granted) and optionally `ttl` (its tokens' lifetime)]}).
//
// Test-only endpoints: GET /__admin/stats ({"tokens": {client_id: n}, "refused": n});
// POST /__admin/launch {"launch", "patient", "appContext"} (what the EHR knows when it launches an app).
// The interaction (login and consent) is scripted: the EHR user is taken as logged in and as agreeing.
import crypto from 'node:crypto';
import http from 'node:http';
import Provider, { errors } from 'oidc-provider';

const TTL = Number(process.env.TOKEN_TTL ?? 300);
const AUDIENCE = process.env.AUDIENCE ?? 'http://127.0.0.1/fhir';
const { clients = [] } = JSON.parse(process.env.CONFIG ?? '{}');
const allowed = new Map(clients.map((client) => [client.client_id, client.scope ?? '']));
const lifetimes = new Map(clients.map((client) => [client.client_id, client.ttl ?? TTL]));

const stats = { tokens: {}, refused: 0 };
const launches = new Map(); // launch id -> {patient, appContext}
const grantLaunch = new Map(); // grant id -> launch id

function signingKey() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { ...privateKey.export({ format: 'jwk' }), kid: crypto.randomUUID(), use: 'sig', alg: 'RS256' };
}

function resourceServer(client) {
  return {
    audience: AUDIENCE, scope: allowed.get(client.clientId) ?? '', accessTokenTTL: lifetimes.get(client.clientId),
    accessTokenFormat: 'jwt', jwt: { sign: { alg: 'RS256' } },
  };
}

const perClient = (ctx, token) => token.resourceServer?.accessTokenTTL ?? TTL;

function configuration() {
  return {
    clients: clients.map(({ scope, ttl, ...client }) => ({ response_types: [], redirect_uris: [], ...client })),
    jwks: { keys: [signingKey()] },
    scopes: ['openid', 'offline_access', 'launch', 'fhirUser'],
    extraParams: {
      launch(ctx, value) {
        if (value !== undefined && !launches.has(value)) throw new errors.InvalidRequest('unknown launch');
      },
      aud(ctx, value) {
        if (value !== undefined && value !== AUDIENCE) throw new errors.InvalidRequest('aud is not this EHR\'s FHIR server');
      },
    },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => AUDIENCE,
        useGrantedResource: () => true,
        getResourceServerInfo(ctx, resource, client) {
          if (resource !== AUDIENCE) throw new errors.InvalidTarget();
          return resourceServer(client);
        },
      },
    },
    enabledJWA: { clientAuthSigningAlgValues: ['RS256', 'RS384', 'ES256', 'ES384'] },
    ttl: { AccessToken: perClient, ClientCredentials: perClient, AuthorizationCode: 60, Grant: 600, Interaction: 600, Session: 600 },
    interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
    pkce: { required: () => true },
    // The launch's id_token is not what these tests look at: no account store, just the subject.
    findAccount: (ctx, sub) => ({ accountId: sub, claims: () => ({ sub, fhirUser: `Practitioner/${sub}` }) }),
  };
}

// The EHR user is logged in already and agrees to what the app asks: login and consent in one step.
async function interaction(provider, req, res) {
  const details = await provider.interactionDetails(req, res);
  const { params, prompt } = details;
  const grant = details.grantId ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId: 'clinician', clientId: params.client_id });
  grant.addOIDCScope(String(params.scope ?? '').split(' ').filter((s) => ['openid', 'launch', 'fhirUser', 'offline_access'].includes(s)).join(' '));
  grant.addResourceScope(AUDIENCE, String(params.scope ?? ''));
  const grantId = await grant.save();
  if (params.launch) grantLaunch.set(grantId, params.launch);
  const result = { consent: { grantId } };
  if (prompt.name === 'login') result.login = { accountId: 'clinician' };
  await provider.interactionFinished(req, res, result, { mergeWithLastSubmission: false });
}

// SMART puts the launch context beside the access token in the token response.
function launchContext(provider) {
  return async (ctx, next) => {
    await next();
    const code = ctx.oidc?.entities?.AuthorizationCode;
    const launch = code && launches.get(grantLaunch.get(code.grantId));
    if (ctx.path === '/token' && ctx.status === 200 && launch) {
      ctx.body = { ...ctx.body, patient: launch.patient, need_patient_banner: false, smart_style_url: undefined,
        ...(launch.appContext ? { appContext: launch.appContext } : {}) };
    }
  };
}

function admin(req, res, url, body) {
  res.setHeader('Content-Type', 'application/json');
  if (url.pathname === '/__admin/stats') return res.end(JSON.stringify(stats));
  if (url.pathname === '/__admin/launch' && req.method === 'POST') {
    const context = JSON.parse(body);
    launches.set(context.launch, context);
    return res.end('{}');
  }
  res.statusCode = 404;
  return res.end('{"error": "unknown admin endpoint"}');
}

const server = http.createServer();
server.listen(Number(process.env.PORT ?? 0), '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, configuration());
  provider.use(launchContext(provider));
  provider.on('grant.success', (ctx) => {
    const id = ctx.oidc.client.clientId;
    stats.tokens[id] = (stats.tokens[id] ?? 0) + 1;
  });
  provider.on('grant.error', () => { stats.refused += 1; });
  const callback = provider.callback();
  server.on('request', async (req, res) => {
    const url = new URL(req.url, issuer);
    try {
      if (url.pathname.startsWith('/__admin/')) {
        const chunks = [];
        for await (const chunk of req) chunks.push(chunk);
        return admin(req, res, url, Buffer.concat(chunks).toString('utf8'));
      }
      if (url.pathname.startsWith('/interaction/')) return await interaction(provider, req, res);
      return callback(req, res);
    } catch (error) {
      res.statusCode = 400;
      res.setHeader('Content-Type', 'application/json');
      return res.end(JSON.stringify({ error: 'invalid_request', error_description: String(error.message) }));
    }
  });
  console.log(`listening on ${issuer}`);
});
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => server.close(() => process.exit(0)));
