// R4 rest-hook Subscriptions, delivered like HAPI: after a committed create or update (a new version)
// of a resource matching an active Subscription's criteria, in the background, in order per Subscription:
//  - channel.payload set: PUT {endpoint}/{type}/{id} with the resource (JSON, or XML for an XML payload);
//  - no payload: an empty POST {endpoint};
//  - channel.header ("Name: value") sent as HTTP headers.
// A failed delivery (no answer, or not 2xx) is retried with doubling waits; when every attempt fails the
// Subscription gets status `error` and an `error` text, and is not used again until someone re-activates it.
//
// Tests need lost notifications too: with `drop` on (env DROP_NOTIFICATIONS=1, or
// POST /__admin/subscriptions?drop=true) matches are counted as dropped and never sent.
import { deepClone, parseSearchRequest } from '@medplum/core';
import { matchesRequest } from './search.mjs';
import { toXml } from './xml.mjs';

const ATTEMPTS = Number(process.env.NOTIFY_ATTEMPTS ?? 4);
const FIRST_RETRY_MS = Number(process.env.NOTIFY_RETRY_MS ?? 100);
const TIMEOUT_MS = 5000;

export class Notifier {
  drop = ['1', 'true', 'yes'].includes((process.env.DROP_NOTIFICATIONS ?? '').toLowerCase());
  counts = { queued: 0, delivered: 0, dropped: 0, failed: 0, pending: 0 };
  queues = new Map(); // Subscription id -> the promise of its last delivery (keeps them in order)
  criteria = new Map(); // criteria text -> parsed search request

  constructor(repo) {
    this.repo = repo;
  }

  status() {
    return { drop: this.drop, ...this.counts };
  }

  // A new version was committed: queue a notification for every active rest-hook Subscription it matches.
  changed(resource) {
    for (const subscription of this.repo.resources.get('Subscription')?.values() ?? []) {
      const { status, criteria, channel } = subscription;
      if (status !== 'active' || channel?.type !== 'rest-hook' || !channel.endpoint || !criteria) continue;
      if (!this.matches(resource, criteria)) continue;
      if (this.drop) {
        this.counts.dropped++;
        continue;
      }
      this.counts.queued++;
      this.counts.pending++;
      const copy = deepClone(resource);
      const previous = this.queues.get(subscription.id) ?? Promise.resolve();
      const next = previous.then(() => this.deliver(subscription.id, copy)).catch((error) => console.error(error))
        .finally(() => this.counts.pending--);
      this.queues.set(subscription.id, next);
    }
  }

  matches(resource, criteria) {
    try {
      if (!this.criteria.has(criteria)) this.criteria.set(criteria, parseSearchRequest(criteria));
      return matchesRequest(this.repo, resource, this.criteria.get(criteria));
    } catch (error) { // criteria checked when the Subscription was written; a failure here must not fail the write
      console.error(`Subscription criteria ${criteria}: ${error.message}`);
      return false;
    }
  }

  async deliver(subscriptionId, resource) {
    let subscription = this.repo.resources.get('Subscription')?.get(subscriptionId);
    if (subscription?.status !== 'active') return; // deleted, switched off, or in error since this was queued
    const { endpoint, payload, header } = subscription.channel;
    const headers = Object.fromEntries((header ?? []).map((line) => line.split(/:(.*)/s).map((s) => s.trim()))
      .filter(([name]) => name));
    const request = payload
      ? { method: 'PUT', url: `${endpoint.replace(/\/+$/, '')}/${resource.resourceType}/${resource.id}`,
        body: payload.includes('xml') ? toXml(resource) : JSON.stringify(resource),
        headers: { ...headers, 'Content-Type': `${payload.split(';')[0]}; charset=utf-8` } }
      : { method: 'POST', url: endpoint, headers };
    let failure;
    for (let attempt = 0; attempt < ATTEMPTS; attempt++) {
      if (attempt) await new Promise((resolve) => setTimeout(resolve, FIRST_RETRY_MS * 2 ** (attempt - 1)));
      try {
        const response = await fetch(request.url, { ...request, signal: AbortSignal.timeout(TIMEOUT_MS) });
        await response.arrayBuffer();
        if (response.ok) {
          this.counts.delivered++;
          return;
        }
        failure = `HTTP ${response.status}`;
      } catch (error) {
        failure = error.cause?.message ?? error.message;
      }
    }
    this.counts.failed++;
    subscription = this.repo.resources.get('Subscription')?.get(subscriptionId);
    if (subscription?.status === 'active') {
      const error = `Failed to deliver ${resource.resourceType}/${resource.id} to ${request.url} after ${ATTEMPTS} `
        + `attempts: ${failure}`;
      await this.repo.updateResource({ ...deepClone(subscription), status: 'error', error });
    }
  }
}
