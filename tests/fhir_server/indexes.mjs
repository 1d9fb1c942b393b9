// Two indexes kept beside the engine's maps, both derived from a resource alone, so a write (or a
// rollback) only ever removes and re-adds the entries of the one resource it touches:
//  - tokens: identifier and meta.tag tokens -> ids. The engine finds them by evaluating every stored
//    resource of the type, so each conditional create got slower with every resource stored;
//  - links: who refers to whom (literal `Type/id` references), so referential integrity is two map
//    look-ups per reference instead of a scan: HAPI refuses dangling references and deleting a target.
import { isResourceType } from '@medplum/core';

const LOCAL = /^([A-Z][A-Za-z]+)\/([A-Za-z0-9\-.]{1,64})(\/_history\/[^/]+)?$/;

// The local target (`Type/id`) of a reference, or undefined: contained (#x), urn:uuid/urn:oid,
// external absolute URLs, conditional and logical references are not checked (nor, on HAPI, stored as links).
export function localTarget(reference, baseUrl) {
  if (typeof reference !== 'string') return undefined;
  const relative = baseUrl && reference.startsWith(`${baseUrl}/`) ? reference.slice(baseUrl.length + 1) : reference;
  const match = LOCAL.exec(relative);
  return match && isResourceType(match[1]) ? `${match[1]}/${match[2]}` : undefined;
}

// Every checkable reference in a resource, with the element path HAPI names in its error (no indices).
export function linksOf(resource, baseUrl) {
  const links = [];
  const walk = (value, path) => {
    if (Array.isArray(value)) {
      for (const item of value) walk(item, path);
    } else if (value && typeof value === 'object') {
      const target = localTarget(value.reference, baseUrl);
      if (target) links.push({ target, path });
      for (const [key, child] of Object.entries(value)) {
        if (key !== 'meta' && child && typeof child === 'object') walk(child, `${path}.${key}`);
      }
    }
  };
  walk(resource, resource.resourceType);
  return links;
}

export class Indexes {
  tokens = new Map(); // `Type|system|value` -> Set(id)
  tokensOf = new Map(); // `Type/id` -> its token keys
  referrers = new Map(); // `Type/id` -> Set(`Type/id` of the resources referring to it)
  links = new Map(); // `Type/id` -> its links [{ target, path }]

  add(resource, baseUrl) {
    const key = `${resource.resourceType}/${resource.id}`;
    this.remove(resource.resourceType, resource.id);
    const tokens = [...[].concat(resource.identifier ?? []),
      ...(resource.meta?.tag ?? []).map((tag) => ({ ...tag, value: tag.code }))]
      .filter((token) => token.system && token.value)
      .map((token) => `${resource.resourceType}|${token.system}|${token.value}`);
    for (const token of tokens) {
      if (!this.tokens.has(token)) this.tokens.set(token, new Set());
      this.tokens.get(token).add(resource.id);
    }
    this.tokensOf.set(key, tokens);
    const links = linksOf(resource, baseUrl);
    for (const { target } of links) {
      if (!this.referrers.has(target)) this.referrers.set(target, new Set());
      this.referrers.get(target).add(key);
    }
    this.links.set(key, links);
  }

  remove(resourceType, id) {
    const key = `${resourceType}/${id}`;
    for (const token of this.tokensOf.get(key) ?? []) this.tokens.get(token)?.delete(id);
    this.tokensOf.delete(key);
    for (const { target } of this.links.get(key) ?? []) {
      const set = this.referrers.get(target);
      set?.delete(key);
      if (set?.size === 0) this.referrers.delete(target);
    }
    this.links.delete(key);
  }

  // ids of the type holding any of the `system|value` tokens
  idsWithToken(resourceType, values) {
    return values.flatMap((value) => [...this.tokens.get(`${resourceType}|${value}`) ?? []]);
  }

  // The first resource other than `key` itself that refers to `key`, with the path it does so in.
  firstReferrer(key) {
    for (const source of this.referrers.get(key) ?? []) {
      if (source !== key) return { source, path: this.links.get(source).find((link) => link.target === key).path };
    }
    return undefined;
  }
}
