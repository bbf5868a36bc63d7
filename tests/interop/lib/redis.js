// A private `redis-server` for the cross-node interop tests: a free loopback port, no persistence
// (`--save "" --appendonly no`), killed by stop() or, at the latest, when the test process exits.

import { spawn, spawnSync } from 'node:child_process'
import net from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'

const START_TIMEOUT_MS = 10_000
const STOP_TIMEOUT_MS = 5_000

/** The redis-server binary: $REDIS_SERVER or `redis-server` on the PATH. */
export function redisServerBin () {
  return process.env.REDIS_SERVER || 'redis-server'
}

/** Whether the redis-server binary can be run (the suite skips the cross-node tests otherwise). */
export function haveRedisServer () {
  const r = spawnSync(redisServerBin(), ['--version'], { stdio: 'ignore' })
  return !r.error && r.status === 0
}

/** A port that was free a moment ago on 127.0.0.1. */
function freePort () {
  return new Promise((resolve, reject) => {
    const srv = net.createServer()
    srv.once('error', reject)
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address()
      srv.close(() => resolve(port))
    })
  })
}

/** Sends PING in RESP; resolves true on +PONG, false on anything else (refused, closed, slow). */
function ping (port) {
  return new Promise((resolve) => {
    const sock = net.connect({ host: '127.0.0.1', port })
    const done = (ok) => { sock.destroy(); resolve(ok) }
    sock.setTimeout(500, () => done(false))
    sock.once('error', () => done(false))
    sock.once('connect', () => sock.write('*1\r\n$4\r\nPING\r\n'))
    sock.once('data', (d) => done(d.toString().startsWith('+PONG')))
  })
}

const live = new Set()
process.on('exit', () => { for (const child of live) child.kill('SIGKILL') })

/**
 * Start a private redis-server.
 * @returns {Promise<{port: number, url: string, stop: () => Promise<void>}>}
 */
export async function startRedis () {
  const port = await freePort()
  const child = spawn(redisServerBin(), [
    '--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'
  ], { stdio: ['ignore', 'ignore', 'pipe'] })
  live.add(child)
  let exited = false
  const exitedP = new Promise((resolve) => child.once('exit', () => { exited = true; live.delete(child); resolve() }))
  let stderr = ''
  child.stderr.setEncoding('utf8')
  child.stderr.on('data', (d) => { stderr = (stderr + d).slice(-2000) })
  child.once('error', () => {})

  const stop = async () => {
    if (exited) return
    child.kill('SIGTERM')
    const timedOut = await Promise.race([exitedP.then(() => false), sleep(STOP_TIMEOUT_MS).then(() => true)])
    if (timedOut) {
      child.kill('SIGKILL')
      await exitedP
    }
  }

  const deadline = Date.now() + START_TIMEOUT_MS
  while (!(await ping(port))) {
    if (exited || Date.now() > deadline) {
      await stop()
      throw new Error(`redis-server on port ${port} did not answer PING within ${START_TIMEOUT_MS} ms\n${stderr}`)
    }
    await sleep(50)
  }
  return { port, url: `redis://127.0.0.1:${port}`, stop }
}
