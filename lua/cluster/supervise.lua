--- The supervisor: what Node's cluster leaves to the user, as defaults that work and
-- hooks a script overrides. `cluster.supervise(options)` starts it; see the README.
--
-- Events on cluster: 'ready'(worker), 'respawn'(worker, replaced, delay_ms),
-- 'giveup'(worker, code, signal) (no respawn by policy), 'crashloop'(info, verdict),
-- 'hold'(info), 'readyTimeout'(worker), 'watchdog'(worker, silent_ms),
-- 'recycle'(worker, reason), 'reload'(phase, info), 'reloadFailed'(info), 'reloaded'(info),
-- 'scale'(n), 'shutdown'(info), 'stopped'(worker, how).
-- @module cluster.supervise
local core = require "cluster.core"
local loop = require "cluster.loop"
local output = require "cluster.output"
local errors = require "cluster.errors"

local M = {}

local type, pairs, ipairs, math, tostring = type, pairs, ipairs, math, tostring

--- The defaults; every field can be given to cluster.supervise{...}.
M.defaults = {
  workers = nil,            -- how many (default: cluster.cpus())
  env = nil,                -- environment for every worker (fork(env))
  restart = "permanent",    -- "permanent" | "transient" | "temporary" | function(worker, code, signal)
  backoff = { initial = 100, factor = 2, max = 10000, reset = 5000 }, -- ms
  intensity = 5,            -- at most `intensity` restarts ...
  period = 10,              -- ... within `period` seconds; one more needed is a crash loop
  onCrashLoop = nil,        -- function(info) -> "retry", pause_ms | "hold" | "exit", code
  crashLoopPause = 30000,   -- ms, the default verdict's pause
  readiness = "listening",  -- "listening" | "explicit" (cluster.worker:ready())
  readyTimeout = 30000,     -- ms; a worker not ready by then is a failed start
  grace = 5000,             -- ms after disconnect before SIGTERM
  killTimeout = 5000,       -- ms after SIGTERM before SIGKILL
  reload = { concurrency = 1 },
  watchdog = nil,           -- { interval = 1000, timeout = 5000, action = "restart" | "report" | function(worker, ms) }
  recycle = nil,            -- { maxRss = bytes, maxConnections = n, maxAge = ms, check = 1000 (ms between checks),
                            --   jitter = 0.2 (limits raised by up to 20% per worker), jitterMs = 1000 (random wait before replacing) }
  output = true,            -- print silent workers' lines prefixed; false: only the 'output' event
  signals = true,           -- SIGTERM/SIGINT shutdown, SIGHUP reload, SIGTTIN/SIGTTOU scale
  shutdownExitCode = 0,     -- the master's exit code after a signal-initiated shutdown
}

local function merge(defaults, given)
  local r = {}
  for k, v in pairs(defaults) do
    if type(v) == "table" then
      local t = {}
      for k2, v2 in pairs(v) do t[k2] = v2 end
      r[k] = t
    else
      r[k] = v
    end
  end
  for k, v in pairs(given or {}) do
    if type(v) == "table" and type(r[k]) == "table" and k ~= "env" then
      for k2, v2 in pairs(v) do r[k][k2] = v2 end
    else
      r[k] = v
    end
  end
  return r
end

local RESTART_KINDS = { permanent = true, transient = true, temporary = true }
-- the options whose default is nil
local OPTIONAL = { workers = true, env = true, onCrashLoop = true, watchdog = true, recycle = true }

local function bad_option(fname, field, want, v)
  errors.raise(string.format("%s: bad option '%s': expected %s, got %s", fname, field, want, tostring(v)))
end

-- a duration in ms (or a count) that timers take: finite, >= 0
local function is_amount(v) return type(v) == "number" and v >= 0 and v < 2 ^ 53 end

-- reload's concurrency (supervise's reload option, reload's own): a whole number >= 1
local function check_concurrency(fname, field, v)
  if v ~= nil and not (type(v) == "number" and (math.tointeger(v) or 0) >= 1) then
    bad_option(fname, field, "an integer >= 1", v)
  end
end

-- Every option, nested ones too, is checked before the supervisor starts: a bad one
-- raises and leaves nothing running.
local function check_options(o, check_env)
  local function bad(field, want, v) bad_option("supervise", field, want, v) end
  if o.workers ~= nil and (math.type(o.workers) ~= "integer" or o.workers < 0) then bad("workers", "an integer >= 0", o.workers) end
  if not (RESTART_KINDS[o.restart] or type(o.restart) == "function") then
    bad("restart", '"permanent", "transient", "temporary" or a function', o.restart)
  end
  if o.readiness ~= "listening" and o.readiness ~= "explicit" then bad("readiness", '"listening" or "explicit"', o.readiness) end
  -- (no crash-loop limit: intensity = math.huge)
  for _, f in ipairs { "intensity", "period" } do
    if type(o[f]) ~= "number" or not (o[f] >= 0) then bad(f, "a number >= 0", o[f]) end
  end
  for _, f in ipairs { "readyTimeout", "grace", "killTimeout", "crashLoopPause" } do
    if not is_amount(o[f]) then bad(f, "a finite number >= 0", o[f]) end
  end
  if o.onCrashLoop ~= nil and type(o.onCrashLoop) ~= "function" then bad("onCrashLoop", "a function", o.onCrashLoop) end
  if o.env ~= nil then
    if type(o.env) ~= "table" then bad("env", "a table", o.env) end
    check_env(o.env, "supervise: bad option 'env'")
  end
  if type(o.backoff) ~= "table" then bad("backoff", "a table", o.backoff) end
  for _, f in ipairs { "initial", "max", "reset" } do
    if not is_amount(o.backoff[f]) then bad("backoff." .. f, "a finite number >= 0", o.backoff[f]) end
  end
  local factor = o.backoff.factor
  if not (is_amount(factor) and factor >= 1) then bad("backoff.factor", "a finite number >= 1", factor) end
  if o.watchdog ~= nil then
    if type(o.watchdog) ~= "table" then bad("watchdog", "a table", o.watchdog) end
    for _, f in ipairs { "interval", "timeout" } do
      local v = o.watchdog[f]
      if v ~= nil and not (is_amount(v) and v > 0) then bad("watchdog." .. f, "a finite number > 0", v) end
    end
    local action = o.watchdog.action
    if action ~= nil and action ~= "restart" and action ~= "report" and type(action) ~= "function" then
      bad("watchdog.action", '"restart", "report" or a function', action)
    end
  end
  if o.recycle ~= nil then
    if type(o.recycle) ~= "table" then bad("recycle", "a table", o.recycle) end
    for _, f in ipairs { "maxRss", "maxConnections", "maxAge", "jitter", "jitterMs" } do
      local v = o.recycle[f]
      if v ~= nil and not is_amount(v) then bad("recycle." .. f, "a finite number >= 0", v) end
    end
    local check_ms = o.recycle.check
    if check_ms ~= nil and not (is_amount(check_ms) and check_ms > 0) then
      bad("recycle.check", "a finite number > 0", check_ms)
    end
  end
  if type(o.reload) ~= "table" then bad("reload", "a table", o.reload) end
  check_concurrency("supervise", "reload.concurrency", o.reload.concurrency)
  if o.output ~= true and o.output ~= false and type(o.output) ~= "function" then
    bad("output", "a boolean or a function", o.output)
  end
  if math.type(o.shutdownExitCode) ~= "integer" then bad("shutdownExitCode", "an integer", o.shutdownExitCode) end
end

-- A typo in an option name would silently fall back to the default: refuse it.
local function check_names(given)
  for k in pairs(given or {}) do
    if M.defaults[k] == nil and not OPTIONAL[k] then
      errors.raise(string.format("supervise: unknown option '%s'", tostring(k)))
    end
  end
end

-- The options of shutdown(opts) and reload(opts), checked (names too) before either
-- changes anything: a bad one raises and leaves the supervisor as it was.
local function check_amount(fname, field, v)
  if not is_amount(v) then bad_option(fname, field, "a finite number >= 0", v) end
end

local CALL_OPTIONS = {
  shutdown = { grace = check_amount, killTimeout = check_amount },
  reload = { concurrency = check_concurrency },
}

local function check_call_options(fname, opts)
  if opts == nil then return end
  if type(opts) ~= "table" then errors.typeerror(fname, 1, "opts", "a table", opts) end
  local known = CALL_OPTIONS[fname]
  for k, v in pairs(opts) do
    if not known[k] then errors.raise(string.format("%s: unknown option '%s'", fname, tostring(k))) end
    known[k](fname, k, v)
  end
end

function M.install(cluster)
  local sup = nil            -- the running supervisor's state, nil until supervise()

  local function now() core.update_time() return core.now() end

  -- ---------------------------------------------------------------------------
  -- escalation: disconnect, then SIGTERM after grace, then SIGKILL

  --- Stops one worker gracefully with escalation. done(worker) once it is dead.
  local function stop_worker(worker, opts, done)
    opts = opts or {}
    local grace = opts.grace or (sup and sup.opts.grace) or 5000
    local kill_after = opts.killTimeout or (sup and sup.opts.killTimeout) or 5000
    worker._stopping = true
    if worker:isDead() then
      if done then loop.defer(done, worker) end
      return
    end
    local timers = {}
    worker:once("exit", function()
      for _, t in ipairs(timers) do loop.clearTimeout(t) end
      -- after every 'exit' listener, the cluster's included
      if done then loop.defer(done, worker) end
    end)
    if worker:isConnected() then worker:disconnect() end
    timers[1] = loop.setTimeout(function()
      if worker:isDead() then return end
      cluster:emit("stopped", worker, "SIGTERM")
      worker:kill("SIGTERM")
      timers[2] = loop.setTimeout(function()
        if worker:isDead() then return end
        cluster:emit("stopped", worker, "SIGKILL")
        worker:kill("SIGKILL")
      end, kill_after)
    end, grace)
  end
  cluster.stopWorker = stop_worker

  -- ---------------------------------------------------------------------------
  -- forking supervised workers

  local function worker_env(env)
    local e = {}
    for k, v in pairs(env or {}) do e[k] = v end
    if sup and sup.opts.watchdog then
      e.LUACLUSTER_HEARTBEAT_MS = tostring(math.max(10, math.floor((sup.opts.watchdog.interval or 1000))))
    end
    return e
  end

  local supervised_fork -- forward

  -- A worker that replaced another (reload, recycle) holds hooks that reach the one it
  -- replaced: once it is ready or dead they are spent, and they go, so that a worker does
  -- not keep every generation before it.
  local function forget_hooks(worker)
    worker._replaces, worker._onReady, worker._onReadyTimeout, worker._exitHook = nil, nil, nil, nil
  end

  local function mark_ready(worker)
    -- too late: a worker that missed its readyTimeout, or is being stopped, stays not ready
    if worker._ready or worker._failedStart or worker._stopping or worker:isDead() then return end
    worker._ready = true
    worker._readyAt = now()
    if worker._readyTimer then loop.clearTimeout(worker._readyTimer) worker._readyTimer = nil end
    cluster:emit("ready", worker)
    -- stable for `reset` ms after ready: the failures so far are forgiven
    local reset = sup and sup.opts.backoff.reset or 0
    worker._stableTimer = loop.setTimeout(function()
      worker._stableTimer = nil
      if sup and not worker:isDead() then sup.failures = 0 end
    end, reset)
    worker._stableTimer:unref()
    if worker._onReady then worker._onReady(worker) end
    forget_hooks(worker)
  end

  supervised_fork = function(env, restarts)
    local worker = cluster.fork(worker_env(env))
    worker.env = env
    worker._supervised = true
    worker._forkedAt = now()
    worker._restarts = restarts or 0
    local o = sup.opts
    local rc = o.recycle
    local jitter = (rc and rc.jitter) or 0.2
    -- each limit raised by up to `jitter`, per worker
    local function limit(max) return max and max * (1 + math.random() * jitter) end
    worker._ageLimit = rc and limit(rc.maxAge)
    worker._connLimit = rc and rc.maxConnections and math.floor(limit(rc.maxConnections))
    worker._rssLimit = rc and limit(rc.maxRss)
    if o.readiness == "listening" then
      -- after the cluster's own 'listening' listeners: 'ready' follows 'listening'
      worker:once("listening", function() loop.defer(mark_ready, worker) end)
    end
    worker._readyTimer = loop.setTimeout(function()
      worker._readyTimer = nil
      if worker._ready or worker:isDead() then return end
      worker._failedStart = true
      cluster:emit("readyTimeout", worker)
      if worker._onReadyTimeout then
        worker._onReadyTimeout(worker) -- a reload's or a recycle's: the old worker stays
      else
        -- a failed start: its exit goes through the respawn decision, unlike a stop
        worker._stoppedAsFailed = true
      end
      stop_worker(worker, { grace = 0 })
    end, o.readyTimeout)
    worker._readyTimer:unref()
    return worker
  end

  -- ---------------------------------------------------------------------------
  -- respawn decisions, backoff, crash loops

  -- the restart delay after `sup.failures` failures in a row (ms, an integer)
  local function backoff_delay()
    local b = sup.opts.backoff
    return math.floor(math.min(b.max, b.initial * b.factor ^ math.max(0, sup.failures - 1)))
  end

  local function is_failure(worker, code, signal)
    if worker._failedStart then return true end
    return signal ~= nil or (code ~= 0 and code ~= nil)
  end

  -- The decision: nil (no respawn), or a delay in ms
  local function decide(worker, code, signal)
    local o = sup.opts
    local failed = is_failure(worker, code, signal)
    local base_delay = 0
    if failed then
      sup.failures = sup.failures + 1
      base_delay = backoff_delay()
    end
    local r = o.restart
    if type(r) == "function" then
      local verdict = r(worker, code, signal)
      if verdict == true then return base_delay end
      if verdict == "now" then return 0 end
      if is_amount(verdict) then return verdict end
      if verdict ~= nil and verdict ~= false then
        local shown = type(verdict) == "string" and string.format("%q", verdict) or tostring(verdict)
        errors.raise("supervise: the restart function returned " .. shown ..
          ': expected false, true, "now" or a delay in ms >= 0')
      end
      return nil
    end
    if r == "temporary" then return nil end
    if r == "transient" and not failed then return nil end
    return base_delay
  end

  local function crash_loop_verdict()
    local o = sup.opts
    local t = now()
    local recent = {}
    for _, ts in ipairs(sup.restartTimes) do
      if t - ts <= o.period * 1000 then recent[#recent + 1] = ts end
    end
    sup.restartTimes = recent
    -- as Erlang/OTP's MaxR/MaxT: at most `intensity` restarts within `period`; the
    -- failure that would need one more is the crash loop
    if #recent < o.intensity then return nil end
    local info = { restarts = #recent, period = o.period, intensity = o.intensity }
    local verdict, arg
    if o.onCrashLoop then
      verdict, arg = o.onCrashLoop(info)
    else
      verdict, arg = "retry", o.crashLoopPause
    end
    if verdict == nil then verdict, arg = "retry", o.crashLoopPause end -- no opinion: the default
    local arg_fits = arg == nil or (verdict == "retry" and is_amount(arg))
      or (verdict == "exit" and math.type(arg) == "integer")
    if not (verdict == "retry" or verdict == "hold" or verdict == "exit") or not arg_fits then
      local function shown(v) return type(v) == "string" and string.format("%q", v) or tostring(v) end
      errors.raise("supervise: onCrashLoop returned " .. shown(verdict) .. ", " .. shown(arg) ..
        ': expected "retry"[, pause in ms >= 0], "hold" or "exit"[, integer exit code]')
    end
    info.verdict = verdict
    if verdict == "retry" then info.pause = arg or o.crashLoopPause end
    if verdict == "exit" then info.exitCode = arg or 1 end
    cluster:emit("crashloop", info, verdict)
    return info
  end

  -- Holding (a crash loop's "hold" verdict): no restarts, but the master stays up with
  -- no worker left, so a ref'd timer keeps the loop alive until scale/reload/shutdown.
  local function set_held(held)
    if not sup then return end
    sup.held = held
    if held and not sup.holdTimer then
      sup.holdTimer = loop.setInterval(function() end, 3600 * 1000)
    elseif not held and sup.holdTimer then
      loop.clearInterval(sup.holdTimer)
      sup.holdTimer = nil
      sup.restartTimes = {} -- resumed: the crash loop's restarts no longer count
    end
  end

  -- How long a crash loop's "retry" pause still holds back restarts (ms, 0 when none).
  local function paused_for()
    return sup.pauseUntil and math.max(0, math.ceil(sup.pauseUntil - now())) or 0
  end

  -- `waited`: what this restart waited before (a pause came after it was decided)
  local function respawn_later(replaced, delay, waited)
    sup.pendingRespawns = sup.pendingRespawns + 1
    waited = (waited or 0) + delay
    local t
    t = loop.setTimeout(function()
      sup.respawnTimers[t] = nil
      sup.pendingRespawns = sup.pendingRespawns - 1
      if not sup.running or sup.held then return end
      -- a crash loop's pause holds back every restart, also those decided before it
      local pause = paused_for()
      if pause > 0 then return respawn_later(replaced, pause, waited) end
      sup.restartTimes[#sup.restartTimes + 1] = now()
      local w = supervised_fork(replaced.env, replaced._restarts + 1)
      cluster:emit("respawn", w, replaced, waited)
    end, delay)
    sup.respawnTimers[t] = true
  end

  -- Cancels one pending respawn (scaling down); true if there was one.
  local function cancel_respawn()
    local t = next(sup.respawnTimers)
    if not t then return false end
    loop.clearTimeout(t)
    sup.respawnTimers[t] = nil
    sup.pendingRespawns = sup.pendingRespawns - 1
    return true
  end

  local function on_exit(worker, code, signal)
    worker._exitedHr = core.hrtime() -- its uptime ends here (worker:stats())
    if not sup or not worker._supervised then return end
    worker._exitCode, worker._exitSignal = code, signal
    if worker._readyTimer then loop.clearTimeout(worker._readyTimer) worker._readyTimer = nil end
    if worker._stableTimer then loop.clearTimeout(worker._stableTimer) worker._stableTimer = nil end
    if worker._exitHook then worker._exitHook(worker, code, signal) end
    forget_hooks(worker)
    if not sup.running or (worker._stopping and not worker._stoppedAsFailed) or worker._replaced then return end
    if not worker._ready and not worker._failedStart then worker._failedStart = true end
    local delay = decide(worker, code, signal)
    if delay == nil then
      cluster:emit("giveup", worker, code, signal)
      return
    end
    if sup.held then return end
    local pause = paused_for()
    if pause > 0 then return respawn_later(worker, math.max(delay, pause)) end
    local info = crash_loop_verdict()
    if info then
      if info.verdict == "hold" then
        set_held(true)
        io.stderr:write(string.format(
          "cluster: crash loop (%d restarts in %gs): holding, no more restarts; the master stays up (cluster.scale(n) or cluster.reload() resumes)\n",
          info.restarts, info.period))
        cluster:emit("hold", info)
        return
      elseif info.verdict == "exit" then
        io.stderr:write(string.format("cluster: crash loop (%d restarts in %gs): stopping the master with exit code %d\n",
          info.restarts, info.period, info.exitCode))
        cluster.shutdown({ grace = 0 }, function() os.exit(info.exitCode) end)
        return
      else
        sup.restartTimes = {}
        sup.pauseUntil = now() + info.pause
        delay = math.max(delay, info.pause)
      end
    end
    respawn_later(worker, delay)
  end

  -- A worker that was being replaced (reload, recycle) goes back to plain supervision
  -- because its replacement failed; if it died meanwhile, its exit is decided now.
  local function release(worker)
    worker._replaced = nil
    if worker:isDead() and sup and sup.running then on_exit(worker, worker._exitCode, worker._exitSignal) end
  end

  -- ---------------------------------------------------------------------------
  -- the periodic check: watchdog and recycling

  local function replace(worker, reason, done)
    if worker._replaced or worker._stopping or worker:isDead() or not sup or not sup.running then return end
    worker._replaced = true
    cluster:emit("recycle", worker, reason)
    local w = supervised_fork(worker.env, worker._restarts)
    w._replaces = worker
    w._onReady = function()
      stop_worker(worker, nil, done)
    end
    -- A replacement that crashes or misses readiness is a failed start: it is not
    -- respawned (the old worker stays, supervised as before) and the next attempt for
    -- this worker waits for the backoff delay.
    local function failed()
      if w._replaceFailed or w._scaledDown then return end
      w._replaceFailed = true
      w._stopping = true
      sup.failures = sup.failures + 1
      worker._recycleAfter = now() + backoff_delay()
      release(worker)
    end
    w._onReadyTimeout = failed
    w._exitHook = function() if not w._ready then failed() end end
  end
  cluster.replaceWorker = replace

  -- How long worker w has been silent (ms), by the heartbeats read so far.
  local function silence(w, t)
    local last = w._channel:last_beat()
    return t - (last > 0 and last or w._forkedAt)
  end

  local function watched(w)
    return sup and sup.running and sup.opts.watchdog and not w:isDead() and w._channel and w:isConnected()
  end

  -- A silence past the timeout, confirmed: 'watchdog', then the action.
  local function watchdog_fire(w)
    if not watched(w) or w._watchdogFired then return end
    local wd = sup.opts.watchdog
    local since = silence(w, now())
    if since <= (wd.timeout or 5000) then return end
    w._watchdogFired = true
    cluster:emit("watchdog", w, since)
    if type(wd.action) == "function" then
      wd.action(w, since)
    elseif wd.action ~= "report" then
      -- a stuck loop can't disconnect: kill it, the respawn policy replaces it
      w._failedStart = not w._ready
      w:kill("SIGKILL")
    end
  end

  -- The watchdog's look at one worker: its loop beats from C; silence means it is stuck.
  -- A silence is confirmed on the next turn of the loop, once the loop has read what
  -- waits in the channel: a master that was not running itself (stopped, not scheduled)
  -- finds every worker silent before it has read their beats.
  local function watch(w, t)
    if silence(w, t) <= (sup.opts.watchdog.timeout or 5000) then
      w._watchdogFired = nil -- beating (again): a later silence is reported again
    elseif not w._watchdogFired and not w._watchdogSuspect then
      w._watchdogSuspect = true
      loop.setTimeout(function()
        w._watchdogSuspect = nil
        watchdog_fire(w)
      end, 1)
    end
  end

  -- Recycling: past a limit, the worker is replaced (after a random wait).
  local function recycle_check(w, t)
    local rc = sup.opts.recycle
    if not w._ready or w._replaced or w._recyclePending or (w._recycleAfter and t < w._recycleAfter) then return end
    local reason
    if w._ageLimit and t - w._forkedAt > w._ageLimit then
      reason = "age"
    elseif w._connLimit and cluster._handedTo(w) >= w._connLimit then
      reason = "connections"
    elseif w._rssLimit then
      local st = core.proc_stats(w.process.pid)
      if st and st.rss > w._rssLimit then reason = "rss" end
    end
    if not reason then return end
    -- jitter, so that workers do not all recycle at once; meanwhile the worker still
    -- counts as one of the supervised (scale, reload)
    local delay = math.random() * (rc.jitterMs or 1000)
    w._recyclePending = true
    loop.setTimeout(function()
      w._recyclePending = nil
      replace(w, reason)
    end, delay):unref()
  end

  local function check()
    local t = now()
    for _, w in pairs(cluster.workers) do
      if w._supervised and not w:isDead() then
        if watched(w) then watch(w, t) end
        if sup.opts.recycle then recycle_check(w, t) end
      end
    end
  end

  -- ---------------------------------------------------------------------------
  -- the public functions

  -- A supervisor's printing of worker output lasts until the next supervisor starts (so
  -- that the lines its stopping workers write last are printed too): then that one's
  -- printer replaces it.
  local function drop_printer()
    if sup and sup.printer then
      cluster:off("output", sup.printer)
      sup.printer = nil
    end
  end

  --- Starts supervising: forks `workers` workers and keeps them as configured.
  -- @tparam[opt] table options see M.defaults and the README
  -- @treturn table the supervisor's options in force
  function cluster.supervise(options)
    if options ~= nil and type(options) ~= "table" then
      error("supervise: bad argument #1 (options): expected a table, got " .. type(options), 2)
    end
    if sup and sup.running then error("supervise: already supervising", 2) end
    check_names(options)
    local o = merge(M.defaults, options)
    check_options(o, cluster._checkEnv)
    o.workers = o.workers or cluster.cpus()
    drop_printer() -- a previous supervisor's
    sup = {
      opts = o, running = true, held = false, failures = 0, restartTimes = {},
      pendingRespawns = 0, respawnTimers = {},
    }
    if o.output then
      sup.printer = o.output == true and output.prefixed or o.output
      cluster:on("output", sup.printer)
    end
    if o.signals then
      -- SIGTERM/SIGINT: a graceful shutdown; the same signal again while it runs (an
      -- impatient Ctrl-C) kills what is left at once and exits
      local stopping = false
      local function stop_and_exit()
        if stopping then
          for _, w in pairs(cluster._all) do
            if not w:isDead() then w:kill("SIGKILL") end
          end
          os.exit(o.shutdownExitCode)
        end
        stopping = true
        cluster.shutdown(nil, function() os.exit(o.shutdownExitCode) end)
      end
      -- during a shutdown there is nothing left to reload or scale: such signals are ignored
      local function unless_stopping(fn) return function() if sup and sup.running then fn() end end end
      cluster._setSignalDefault("SIGTERM", stop_and_exit)
      cluster._setSignalDefault("SIGINT", stop_and_exit)
      cluster._setSignalDefault("SIGHUP", unless_stopping(function() cluster.reload() end))
      local function scale_by(d) return function() cluster.scale(math.max(0, cluster._supervisedCount() + d)) end end
      cluster._setSignalDefault("SIGTTIN", unless_stopping(scale_by(1)))
      cluster._setSignalDefault("SIGTTOU", unless_stopping(scale_by(-1)))
    end
    local interval = math.min(o.watchdog and (o.watchdog.interval or 1000) or 1000,
      o.recycle and (o.recycle.check or 1000) or 1000)
    if o.watchdog or o.recycle then
      sup.checkTimer = loop.setInterval(check, interval)
      sup.checkTimer:unref()
    end
    -- a supervising master stays up until shutdown, also with no worker left
    -- (after scale(0), or workers that were not to be restarted)
    sup.keepAlive = loop.setInterval(function() end, 3600 * 1000)
    for _ = 1, o.workers do supervised_fork(o.env, 0) end
    return o
  end

  cluster._onSupervisedExit = on_exit

  -- The supervised workers that count (by id): alive, not being replaced, and not on
  -- their way out, except a failed start being stopped (it is to be respawned).
  local function live_supervised()
    local list = {}
    for _, w in pairs(cluster._all) do
      if w._supervised and not w:isDead() and not w._replaced and (not w._stopping or w._stoppedAsFailed) then
        list[#list + 1] = w
      end
    end
    table.sort(list, function(a, b) return a.id < b.id end)
    return list
  end
  cluster._supervisedCount = function() return #live_supervised() + (sup and sup.pendingRespawns or 0) end

  -- The worker `w` stands in for, if it is still starting to replace one (reload, recycle).
  local function stand_in_for(w)
    if not w._ready then return w._replaces end
  end

  -- In what order scale() stops workers, the last first: stand-ins, then the others,
  -- then failed starts already being stopped; by id within each.
  local function scale_rank(w)
    if w._stoppedAsFailed then return 3 end
    return stand_in_for(w) and 1 or 2
  end

  -- Stops one worker to scale down: a failed start is no longer respawned; a stand-in
  -- takes the worker it replaces along, and its reload or recycle skips that worker
  -- instead of failing.
  local function scale_down(w)
    w._stoppedAsFailed = nil
    local old = stand_in_for(w)
    if old then
      w._scaledDown = true
      stop_worker(old)
    end
    stop_worker(w)
  end

  --- Sets the number of supervised workers: forks more, or stops the newest.
  function cluster.scale(n)
    if math.type(n) ~= "integer" or n < 0 then
      error("scale: bad argument #1 (n): expected an integer >= 0, got " .. tostring(n), 2)
    end
    if not (sup and sup.running) then error("scale: no supervisor running: call cluster.supervise{...} first", 2) end
    set_held(false)
    sup.opts.workers = n
    local live = live_supervised()
    local have = #live + sup.pendingRespawns
    for _ = have + 1, n do supervised_fork(sup.opts.env, 0) end
    -- fewer: first the respawns not yet due, then workers by scale_rank
    local excess = have - n
    while excess > 0 and cancel_respawn() do excess = excess - 1 end
    table.sort(live, function(a, b)
      local ra, rb = scale_rank(a), scale_rank(b)
      if ra ~= rb then return ra < rb end
      return a.id < b.id
    end)
    for i = #live, #live - excess + 1, -1 do scale_down(live[i]) end
    cluster:emit("scale", n)
  end

  --- Stops every worker gracefully (disconnect, then SIGTERM, then SIGKILL) and the
  -- supervisor; callback() once all are dead.
  -- @tparam[opt] table opts {grace=, killTimeout=}
  -- @tparam[opt] function callback
  function cluster.shutdown(opts, callback)
    if type(opts) == "function" then opts, callback = nil, opts end
    check_call_options("shutdown", opts)
    if callback ~= nil and type(callback) ~= "function" then
      error("shutdown: bad argument #2 (callback): expected a function, got " .. type(callback), 2)
    end
    if sup then
      sup.running = false
      set_held(false)
      for t in pairs(sup.respawnTimers) do loop.clearTimeout(t) end
      sup.respawnTimers = {}
      if sup.checkTimer then loop.clearInterval(sup.checkTimer) sup.checkTimer = nil end
      if sup.keepAlive then loop.clearInterval(sup.keepAlive) sup.keepAlive = nil end
    end
    cluster:emit("shutdown", opts or {})
    local waiting = 1
    local function one_done()
      waiting = waiting - 1
      if waiting == 0 then
        -- (unless a new supervisor started meanwhile)
        if not (sup and sup.running) and cluster._closeSignals then cluster._closeSignals() end
        if callback then callback() end
      end
    end
    for _, w in pairs(cluster._all) do
      if not w:isDead() then
        waiting = waiting + 1
        stop_worker(w, opts, one_done)
      end
    end
    loop.defer(one_done)
  end

  --- Replaces every worker, new before old, gated on the new worker's readiness,
  -- `concurrency` at a time. callback(err) at the end; err (code ERR_RELOAD_FAILED) when
  -- a new worker failed readiness (the reload stops and the old workers stay), or
  -- ERR_RELOAD_RUNNING at once when a reload is under way.
  function cluster.reload(opts, callback)
    if type(opts) == "function" then opts, callback = nil, opts end
    check_call_options("reload", opts)
    if not (sup and sup.running) then error("reload: no supervisor running: call cluster.supervise{...} first", 2) end
    if sup.reloading then
      if callback then
        loop.defer(callback, errors.new("ERR_RELOAD_RUNNING", "reload", "reload: a reload is already running"))
      end
      return false
    end
    set_held(false)
    sup.failures = 0
    local concurrency = math.tointeger((opts and opts.concurrency) or sup.opts.reload.concurrency or 1)
    local old = live_supervised()
    local total = #old
    local index, active, replaced, failed = 0, 0, 0, false
    local this = sup
    sup.reloading = true
    cluster:emit("reload", "start", { workers = total })
    -- fewer workers than configured (after a crash loop's hold): start the missing ones,
    -- already of the new generation
    for _ = total + sup.pendingRespawns + 1, sup.opts.workers do supervised_fork(sup.opts.env, 0) end

    local finish
    local function next_batch()
      while not failed and active < concurrency and index < #old do
        index = index + 1
        local o = old[index]
        -- (one a recycle is replacing already gets a worker of the new generation)
        if not o:isDead() and not o._stopping and not o._replaced then
          active = active + 1
          o._replaced = true
          local new = supervised_fork(o.env, o._restarts)
          new._replaces = o
          new._onReady = function()
            if new._reloadSettled then return end
            new._reloadSettled = true
            -- the old worker leaves distribution at once (disconnect), then drains
            stop_worker(o)
            replaced = replaced + 1
            active = active - 1
            cluster:emit("reload", "replaced", { old = o, new = new })
            next_batch()
            finish()
          end
          new._exitHook = function()
            if not new._ready then new._onReadyTimeout(new) end
          end
          new._onReadyTimeout = function()
            if new._reloadSettled then return end
            new._reloadSettled = true
            active = active - 1
            if new._scaledDown then
              next_batch() -- scaled away with the worker it was to replace: nothing to do there
            else
              failed = true
              new._stopping = true -- not respawned: the old worker stays
              release(o)
            end
            finish()
          end
        end
      end
    end
    -- (called after each settled worker and once deferred: a new worker whose spawn
    -- failed settles before the deferred call, which must then find the reload ended)
    local ended = false
    finish = function()
      if ended or active > 0 or (index < #old and not failed) then return end
      ended = true
      this.reloading = false
      if failed then
        -- (a shutdown stops the new workers too: then nobody stays)
        local reason = this.running and "a new worker failed readiness" or "cluster.shutdown() stopped it"
        local info = { replaced = replaced, workers = total, reason = reason }
        -- release the ones that never started
        for i = index + 1, #old do old[i]._replaced = nil end
        cluster:emit("reloadFailed", info)
        if callback then
          callback(errors.new("ERR_RELOAD_FAILED", "reload",
            string.format("reload: %s (%d of %d workers replaced%s)", reason, replaced, total,
              this.running and "; the others stay" or ""),
            { replaced = replaced, workers = total }))
        end
      else
        local info = { replaced = replaced, workers = total }
        cluster:emit("reloaded", info)
        if callback then callback(nil) end
      end
    end
    next_batch()
    loop.defer(finish)
    return true
  end

  --- The supervisor's options in force, or nil.
  function cluster.supervisor() return sup and sup.opts end

  cluster._markReady = mark_ready
end

return M
