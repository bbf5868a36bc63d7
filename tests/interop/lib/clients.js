// Stock Yjs clients for the interop tests: y-websocket providers (v3; v1 and v2 through npm aliases
// when installed) over the `ws` package, plus polling helpers with deadlines.

import { setTimeout as sleep } from 'node:timers/promises'
import { WebSocket } from 'ws'
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'

export { Y, WebsocketProvider, sleep }

// Every provider adds a process 'exit' listener; a test with ten of them is not a leak.
process.setMaxListeners(50)

/** The provider of an older y-websocket installed under an npm alias, or null if it is missing. */
const optionalProvider = (alias) => import(alias).then((m) => m.WebsocketProvider).catch(() => null)
/** y-websocket v1's provider (npm alias `y-websocket-v1`), or null. */
export const WebsocketProviderV1 = await optionalProvider('y-websocket-v1')
/** y-websocket v2's provider (npm alias `y-websocket-v2`), or null. */
export const WebsocketProviderV2 = await optionalProvider('y-websocket-v2')

/**
 * Poll `check` until it returns a truthy value, or throw after `timeoutMs`.
 * `describe()` explains the last observed state in the error.
 */
export async function waitFor (check, { timeoutMs = 10_000, intervalMs = 20, what = 'condition', describe } = {}) {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const value = await check()
    if (value) return value
    if (Date.now() > deadline) {
      const detail = describe ? `\nlast observed: ${describe()}` : ''
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${detail}`)
    }
    await sleep(intervalMs)
  }
}

/**
 * Tracks every provider and doc a test makes so that one `destroyAll()` (in `t.after`) cleans up.
 */
export class Clients {
  constructor () {
    /** @type {{doc: Y.Doc, provider: any}[]} */
    this.all = []
  }

  /**
   * Connect a stock provider to `server` in `room`.
   * @param {{url: string}} server
   * @param {string} room
   * @param {{doc?: Y.Doc, Provider?: any, params?: Record<string,string>}} [opts]
   */
  connect (server, room, { doc = new Y.Doc(), Provider = WebsocketProvider, ...opts } = {}) {
    const provider = new Provider(server.url, room, doc, {
      WebSocketPolyfill: WebSocket,
      // Providers in one Node process would otherwise sync through a BroadcastChannel and never
      // need the server: every test must go through tandem.
      disableBc: true,
      ...opts
    })
    const client = { doc, provider, closes: [] }
    provider.on('connection-close', (event) => {
      if (event) client.closes.push({ code: event.code, reason: event.reason })
    })
    this.all.push(client)
    return client
  }

  destroyAll () {
    for (const { provider, doc } of this.all.splice(0)) {
      provider.destroy()
      doc.destroy()
    }
  }
}

/** Resolve once `provider` has synced with the server (y-websocket's 'sync' event with true). */
export function waitSynced (provider, { timeoutMs = 10_000 } = {}) {
  if (provider.synced) return Promise.resolve()
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      provider.off('sync', onSync)
      reject(new Error(`provider for ${provider.url} did not sync within ${timeoutMs} ms ` +
        `(wsconnected=${provider.wsconnected})`))
    }, timeoutMs)
    const onSync = (synced) => {
      if (!synced) return
      clearTimeout(timer)
      provider.off('sync', onSync)
      resolve()
    }
    provider.on('sync', onSync)
  })
}

/** A JSON-able snapshot of the shared types the tests use (map keys sorted, so snapshots compare). */
export function contents (doc) {
  const map = doc.getMap('map').toJSON()
  return {
    text: doc.getText('text').toString(),
    map: Object.fromEntries(Object.keys(map).sort().map((k) => [k, map[k]]))
  }
}

/** Wait until every doc holds the same text and map; returns the agreed contents. */
export async function waitConverged (docs, { timeoutMs = 15_000 } = {}) {
  const snap = () => docs.map((d) => JSON.stringify(contents(d)))
  await waitFor(() => new Set(snap()).size === 1, {
    timeoutMs,
    what: `${docs.length} docs to converge`,
    describe: () => snap().map((s, i) => `\n  doc ${i}: ${s.length > 300 ? s.slice(0, 300) + '…' : s}`).join('')
  })
  return contents(docs[0])
}

/** A room name unique to this run, so tests sharing a server never share a room by accident. */
export function uniqueRoom (prefix) {
  return `${prefix}-${process.pid}-${Math.random().toString(36).slice(2, 8)}`
}
