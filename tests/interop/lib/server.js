// Starts and stops a real `tandem` process for the interop tests.
//
// The binary comes from $TANDEM_BIN (relative paths are taken from the current directory), else
// from <repo>/target/debug/tandem (or $CARGO_TARGET_DIR/debug/tandem). Each server gets
// `--bind 127.0.0.1:0` and its own fresh `--data-dir`; the real port is read from the
// `listening on <addr>` log line.

import { spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { mkdtemp, rm } from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

const here = path.dirname(fileURLToPath(import.meta.url))
export const repoRoot = path.resolve(here, '..', '..', '..')

const START_TIMEOUT_MS = 20_000
const STOP_TIMEOUT_MS = 15_000
const LOG_LINES_KEPT = 200

/** Absolute path of the tandem binary under test. */
export function tandemBin () {
  if (process.env.TANDEM_BIN) return path.resolve(process.env.TANDEM_BIN)
  const targetDir = process.env.CARGO_TARGET_DIR
    ? path.resolve(repoRoot, process.env.CARGO_TARGET_DIR)
    : path.join(repoRoot, 'target')
  return path.join(targetDir, 'debug', 'tandem')
}

// Servers still running, killed hard if the test process goes away without stopping them.
const live = new Set()
const killAll = () => { for (const s of live) s.child.kill('SIGKILL') }
process.on('exit', killAll)
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.once(sig, () => { killAll(); process.exit(128 + os.constants.signals[sig]) })
}

// eslint-disable-next-line no-control-regex
const ANSI = /\x1b\[[0-9;]*m/g
const LISTENING = /listening on\D*?((?:\d{1,3}\.){3}\d{1,3}|\[[0-9a-fA-F:.]+\]|localhost):(\d+)/

/**
 * Environment for the child: ours minus any TANDEM_* setting (a developer's TANDEM_DATABASE_URL
 * must not leak into a test server), plus `env`.
 */
function childEnv (env) {
  const out = {}
  for (const [k, v] of Object.entries(process.env)) {
    if (!k.startsWith('TANDEM_')) out[k] = v
  }
  return { RUST_LOG: 'info', NO_COLOR: '1', RUST_BACKTRACE: '1', ...out, ...env }
}

export class TandemServer {
  constructor (child, dataDir, ownsDataDir) {
    this.child = child
    this.dataDir = dataDir
    this.ownsDataDir = ownsDataDir
    this.port = 0
    this.logLines = []
    /** Resolves with { code, signal } when the process exits, for whatever reason. */
    this.exited = new Promise((resolve) => {
      child.once('exit', (code, signal) => { live.delete(this); resolve({ code, signal }) })
    })
    this.exitInfo = null
    this.exited.then((info) => { this.exitInfo = info })
  }

  get host () { return `127.0.0.1:${this.port}` }
  /** The `serverUrl` a WebsocketProvider takes. */
  get url () { return `ws://${this.host}` }
  get httpUrl () { return `http://${this.host}` }

  /** The last lines the server logged, for failure messages. */
  logs () { return this.logLines.join('\n') }

  /**
   * Graceful stop: SIGTERM, then wait for the process to exit. If it has not exited after
   * `timeoutMs` it is killed with SIGKILL and this rejects (a hung shutdown is a bug).
   * @returns {Promise<{code: number|null, signal: string|null}>}
   */
  async stop ({ timeoutMs = STOP_TIMEOUT_MS, removeDataDir = this.ownsDataDir } = {}) {
    try {
      if (this.exitInfo) return this.exitInfo
      this.child.kill('SIGTERM')
      let timer
      const timedOut = new Promise((resolve) => { timer = setTimeout(() => resolve(null), timeoutMs) })
      const info = await Promise.race([this.exited, timedOut])
      clearTimeout(timer)
      if (info === null) {
        this.child.kill('SIGKILL')
        await this.exited
        throw new Error(`tandem did not exit within ${timeoutMs} ms of SIGTERM\n--- server log ---\n${this.logs()}`)
      }
      return info
    } finally {
      if (removeDataDir) await rm(this.dataDir, { recursive: true, force: true })
    }
  }

  /** Crash: SIGKILL, no chance to flush. */
  async kill () {
    if (!this.exitInfo) this.child.kill('SIGKILL')
    return this.exited
  }
}

/**
 * Start tandem on 127.0.0.1 with an OS-chosen port.
 * @param {{dataDir?: string, args?: string[], env?: Record<string,string>}} [opts]
 *   dataDir: reuse a data directory (e.g. to restart); otherwise a fresh temp dir is made and
 *   removed again by stop().
 * @returns {Promise<TandemServer>}
 */
export async function startTandem ({ dataDir, args = [], env = {} } = {}) {
  const bin = tandemBin()
  if (!existsSync(bin)) {
    throw new Error(`tandem binary not found at ${bin}: run \`cargo build --bin tandem\` or set TANDEM_BIN`)
  }
  const ownsDataDir = !dataDir
  dataDir ??= await mkdtemp(path.join(os.tmpdir(), 'tandem-interop-'))
  const child = spawn(bin, ['--bind', '127.0.0.1:0', '--data-dir', dataDir, ...args], {
    env: childEnv(env),
    stdio: ['ignore', 'pipe', 'pipe']
  })
  const server = new TandemServer(child, dataDir, ownsDataDir)
  live.add(server)
  const verbose = !!process.env.TANDEM_INTEROP_VERBOSE

  const port = await new Promise((resolve, reject) => {
    let done = false
    const finish = (err, value) => {
      if (done) return
      done = true
      clearTimeout(timer)
      err ? reject(err) : resolve(value)
    }
    const timer = setTimeout(() => finish(new Error(
      `tandem printed no "listening on" line within ${START_TIMEOUT_MS} ms\n--- server log ---\n${server.logs()}`)), START_TIMEOUT_MS)
    child.once('error', (err) => finish(err))
    server.exited.then(({ code, signal }) => finish(new Error(
      `tandem exited during start-up (code ${code}, signal ${signal})\n--- server log ---\n${server.logs()}`)))
    for (const stream of [child.stdout, child.stderr]) {
      let partial = ''
      stream.setEncoding('utf8')
      stream.on('data', (chunk) => {
        const lines = (partial + chunk).split('\n')
        partial = lines.pop()
        for (const raw of lines) {
          const line = raw.replace(ANSI, '')
          server.logLines.push(line)
          if (server.logLines.length > LOG_LINES_KEPT) server.logLines.shift()
          if (verbose) process.stderr.write(`[tandem:${server.port || '?'}] ${line}\n`)
          const m = LISTENING.exec(line)
          if (m) finish(null, Number(m[2]))
        }
      })
    }
  }).catch(async (err) => {
    await server.kill()
    if (ownsDataDir) await rm(dataDir, { recursive: true, force: true })
    throw err
  })
  server.port = port
  return server
}
