// The test IdP: a real, certified OpenID Provider (the npm package
// `oidc-provider`, pinned in package.json) behind a Node https server, set up
// from a JSON file that the Python tests write (tests/oidc_idp.py).
//
//   node server.mjs CONFIG.json
//
// CONFIG: {
//   "host": "127.0.0.1", "port": 0,           // 0: any free port
//   "cert": "leaf.pem", "key": "leaf.key",    // TLS, from a CA the test made
//   "users": "users.json",                    // re-read on every lookup
//   "jwks": {"keys": [...]},                  // private signing keys (JWK)
//   "clients": [{client_id, ...metadata}],
//   "acr_values": ["urn:gateway:test:pwd", "urn:gateway:test:mfa"],
//   "ttl": {"AccessToken": 60, "IdToken": 60, "RefreshToken": 86400, "DeviceCode": 600}
// }
// users.json: {"alice": {"sub": "...", "password": "...", "otp": "123456" (optional),
//              "email": "...", "groups": ["legal"], "disabled": false}}
//
// Once listening it prints one line of JSON to stdout: {"issuer": "https://..."}.
//
// Sign-in is a plain HTML form (login, password, optional one-time code) at
// /interaction/{uid}: a sign-in with the right one-time code gets the MFA
// `acr` and `amr: ["pwd", "otp"]`, one without gets the password `acr`.
// Consent is implied (the gateway is a first-party client). A user marked
// "disabled" (or removed) is no account any more: findAccount returns nothing,
// so refresh grants and userinfo fail, as at a real IdP.
import { readFileSync } from 'node:fs';
import { createServer } from 'node:https';
import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const [PWD, MFA] = config.acr_values ?? ['urn:gateway:test:pwd', 'urn:gateway:test:mfa'];

function users() {
  return JSON.parse(readFileSync(config.users, 'utf8'));
}

function userBySub(sub) {
  for (const [name, user] of Object.entries(users())) {
    if (user.sub === sub && !user.disabled) return { name, ...user };
  }
  return undefined;
}

function escape(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

async function readForm(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function send(res, status, body) {
  res.writeHead(status, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
  res.end(body);
}

const server = createServer({ cert: readFileSync(config.cert), key: readFileSync(config.key) });
await new Promise((resolve) => server.listen(config.port ?? 0, config.host ?? '127.0.0.1', resolve));
const { port } = server.address();
const issuer = `https://${config.host ?? '127.0.0.1'}:${port}`;

const provider = new Provider(issuer, {
  clients: config.clients,
  jwks: config.jwks,
  acrValues: [PWD, MFA],
  claims: {
    acr: null,
    amr: null,
    auth_time: null,
    sid: null,
    // acr and amr in every ID token, not only when asked for with acr_values:
    // the gateway's MFA rule reads them.
    openid: ['sub', 'acr', 'amr', 'auth_time'],
    profile: ['preferred_username', 'name'],
    email: ['email', 'email_verified'],
    groups: ['groups'],
  },
  conformIdTokenClaims: false, // scope claims go into the ID token too
  scopes: ['openid', 'offline_access', 'profile', 'email', 'groups'],
  cookies: { keys: ['gateway-test-idp-cookie-key'] },
  features: {
    devInteractions: { enabled: false },
    deviceFlow: { enabled: true },
    revocation: { enabled: true },
    userinfo: { enabled: true },
  },
  ttl: {
    AccessToken: config.ttl?.AccessToken ?? 60,
    IdToken: config.ttl?.IdToken ?? 60,
    RefreshToken: config.ttl?.RefreshToken ?? 86400,
    DeviceCode: config.ttl?.DeviceCode ?? 600,
    Interaction: 600,
    Session: 3600,
    Grant: 86400,
  },
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  async findAccount(ctx, sub) {
    const user = userBySub(sub);
    if (!user) return undefined;
    return {
      accountId: sub,
      async claims() {
        return {
          sub,
          preferred_username: user.name,
          name: user.name,
          email: user.email ?? `${user.name}@example.test`,
          email_verified: true,
          groups: user.groups ?? [],
        };
      },
    };
  },
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId
      || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) {
      const found = await ctx.oidc.provider.Grant.find(grantId);
      if (found) return found;
    }
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope('openid offline_access profile email groups');
    await grant.save();
    return grant;
  },
});

async function interaction(req, res, url) {
  const parts = url.pathname.split('/').filter(Boolean); // interaction, uid, [login]
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== parts[1]) return send(res, 400, 'interaction mismatch');
  if (req.method === 'GET' && details.prompt.name === 'consent') {
    // The gateway is a first-party client: consent is implied, whatever is missing.
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: details.session.accountId, clientId: details.params.client_id });
    const missing = details.prompt.details;
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    const grantId = await grant.save();
    return provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
  }
  if (req.method === 'GET') {
    return send(
      res,
      200,
      `<!doctype html><title>Sign in</title><form method="post" action="/interaction/${escape(details.uid)}/login">`
        + '<input name="login"><input name="password" type="password"><input name="otp">'
        + '<button>Sign in</button></form>',
    );
  }
  if (req.method === 'POST' && parts[2] === 'login') {
    const form = await readForm(req);
    const user = users()[form.get('login') ?? ''];
    if (!user || user.disabled || user.password !== form.get('password')) {
      return send(res, 403, 'wrong login or password');
    }
    const mfa = Boolean(user.otp) && form.get('otp') === user.otp;
    const result = {
      login: { accountId: user.sub, acr: mfa ? MFA : PWD, amr: mfa ? ['pwd', 'otp'] : ['pwd'] },
    };
    return provider.interactionFinished(req, res, result, { mergeWithLastSubmission: false });
  }
  return send(res, 405, 'method not allowed');
}

const callback = provider.callback();
server.on('request', (req, res) => {
  const url = new URL(req.url, issuer);
  if (url.pathname.startsWith('/interaction/')) {
    interaction(req, res, url).catch((err) => {
      console.error(err);
      send(res, 500, 'interaction failed');
    });
    return;
  }
  callback(req, res);
});

process.on('SIGTERM', () => server.close(() => process.exit(0)));
process.stdout.write(`${JSON.stringify({ issuer })}\n`);
