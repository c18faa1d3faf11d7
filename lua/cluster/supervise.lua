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
  end

  supervised_fork = function(env, restarts)
    local worker = cluster.fork(worker_env(env))
    worker.env = env
    worker._supervised = true
    worker._forkedAt = now()
    worker._restarts = restarts or 0
    local o = sup.opts
    local jitter = (o.recycle and o.recycle.jitter) or 0.2
    worker._ageLimit = o.recycle and o.recycle.maxAge and o.recycle.maxAge * (1 + math.random() * jitter)
    worker._connLimit = o.recycle and o.recycle.maxConnections and
      math.floor(o.recycle.maxConnections * (1 + math.random() * jitter))
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
      if type(verdict) == "number" then return verdict end
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
    if verdict ~= "retry" and verdict ~= "hold" and verdict ~= "exit" then
      verdict, arg = "retry", o.crashLoopPause
    end
    info.verdict, info.pause, info.exitCode = verdict, verdict == "retry" and (arg or o.crashLoopPause) or nil,
      verdict == "exit" and (arg or 1) or nil
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
    end
  end

  local function respawn_later(replaced, delay)
    sup.pendingRespawns = sup.pendingRespawns + 1
    local t
    t = loop.setTimeout(function()
      sup.respawnTimers[t] = nil
      sup.pendingRespawns = sup.pendingRespawns - 1
      if not sup.running or sup.held then return end
      sup.restartTimes[#sup.restartTimes + 1] = now()
      local w = supervised_fork(replaced.env, replaced._restarts + 1)
      cluster:emit("respawn", w, replaced, delay)
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
    if not sup.running or (worker._stopping and not worker._stoppedAsFailed) or worker._replaced then return end
    if not worker._ready and not worker._failedStart then worker._failedStart = true end
    local delay = decide(worker, code, signal)
    if delay == nil then
      cluster:emit("giveup", worker, code, signal)
      return
    end
    if sup.held then return end
    local info = crash_loop_verdict()
    if info then
      if info.verdict == "hold" then
        set_held(true)
        io.stderr:write(string.format(
          "cluster: crash loop (%d restarts in %ds): holding, no more restarts; the master stays up (cluster.scale(n) or cluster.reload() resumes)\n",
          info.restarts, info.period))
        cluster:emit("hold", info)
        return
      elseif info.verdict == "exit" then
        io.stderr:write(string.format("cluster: crash loop (%d restarts in %ds): stopping the master with exit code %d\n",
          info.restarts, info.period, info.exitCode))
        cluster.shutdown({ grace = 0 }, function() os.exit(info.exitCode) end)
        return
      else
        sup.restartTimes = {}
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
    w._onReady = function()
      stop_worker(worker, nil, done)
    end
    -- A replacement that crashes or misses readiness is a failed start: it is not
    -- respawned (the old worker stays, supervised as before) and the next attempt for
    -- this worker waits for the backoff delay.
    local function failed()
      if w._replaceFailed then return end
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

  local function check()
    local o = sup.opts
    local t = now()
    for _, w in pairs(cluster.workers) do
      if w._supervised and not w:isDead() then
        -- watchdog: the worker's loop beats from C; silence means it is stuck
        local wd = o.watchdog
        if wd and w._channel and w:isConnected() then
          local last = w._channel:last_beat()
          local since = t - (last > 0 and last or w._forkedAt)
          if since <= (wd.timeout or 5000) then
            w._watchdogFired = nil -- beating (again): a later silence is reported again
          elseif not w._watchdogFired then
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
        end
        local rc = o.recycle
        if rc and w._ready and not w._replaced and not (w._recycleAfter and t < w._recycleAfter) then
          local reason
          if w._ageLimit and t - w._forkedAt > w._ageLimit then
            reason = "age"
          elseif w._connLimit and cluster._handedTo(w) >= w._connLimit then
            reason = "connections"
          elseif rc.maxRss then
            local st = core.proc_stats(w.process.pid)
            if st and st.rss > rc.maxRss then reason = "rss" end
          end
          if reason then
            -- jitter, so that workers do not all recycle at once
            local delay = math.random() * (rc.jitterMs or 1000)
            w._replaced = "pending"
            loop.setTimeout(function()
              w._replaced = nil
              replace(w, reason)
            end, delay)
          end
        end
      end
    end
  end

  -- ---------------------------------------------------------------------------
  -- the public functions

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
    sup = {
      opts = o, running = true, held = false, failures = 0, restartTimes = {},
      pendingRespawns = 0, respawnTimers = {},
    }
    if o.output then
      cluster:on("output", o.output == true and output.prefixed or o.output)
    end
    if o.signals then
      cluster._setSignalDefault("SIGTERM", function(name) cluster.shutdown(nil, function() os.exit(o.shutdownExitCode) end) end)
      cluster._setSignalDefault("SIGINT", function(name) cluster.shutdown(nil, function() os.exit(o.shutdownExitCode) end) end)
      cluster._setSignalDefault("SIGHUP", function() cluster.reload() end)
      cluster._setSignalDefault("SIGTTIN", function() cluster.scale(cluster._supervisedCount() + 1) end)
      cluster._setSignalDefault("SIGTTOU", function() cluster.scale(math.max(0, cluster._supervisedCount() - 1)) end)
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

  local function live_supervised()
    local list = {}
    for _, w in pairs(cluster.workers) do
      if w._supervised and not w:isDead() and not w._stopping and not w._replaced then list[#list + 1] = w end
    end
    table.sort(list, function(a, b) return a.id < b.id end)
    return list
  end
  cluster._supervisedCount = function() return #live_supervised() + (sup and sup.pendingRespawns or 0) end

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
    -- fewer: first the respawns not yet due, then the newest workers
    local excess = have - n
    while excess > 0 and cancel_respawn() do excess = excess - 1 end
    for i = #live, #live - excess + 1, -1 do stop_worker(live[i]) end
    cluster:emit("scale", n)
  end

  --- Stops every worker gracefully (disconnect, then SIGTERM, then SIGKILL) and the
  -- supervisor; callback() once all are dead.
  -- @tparam[opt] table opts {grace=, killTimeout=}
  -- @tparam[opt] function callback
  function cluster.shutdown(opts, callback)
    if type(opts) == "function" then opts, callback = nil, opts end
    if opts ~= nil and type(opts) ~= "table" then
      error("shutdown: bad argument #1 (opts): expected a table, got " .. type(opts), 2)
    end
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
        if cluster._closeSignals then cluster._closeSignals() end
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
    if opts ~= nil and type(opts) ~= "table" then
      error("reload: bad argument #1 (opts): expected a table, got " .. type(opts), 2)
    end
    check_concurrency("reload", "concurrency", opts and opts.concurrency)
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
        if not o:isDead() and not o._stopping then
          active = active + 1
          o._replaced = true
          local new = supervised_fork(o.env, o._restarts)
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
            failed = true
            new._stopping = true -- not respawned: the old worker stays
            active = active - 1
            release(o)
            finish()
          end
        end
      end
    end
    finish = function()
      if active > 0 or (index < #old and not failed) then return end
      sup.reloading = false
      if failed then
        local info = { replaced = replaced, workers = total, reason = "a new worker failed readiness" }
        -- release the ones that never started
        for i = index + 1, #old do old[i]._replaced = nil end
        cluster:emit("reloadFailed", info)
        if callback then
          callback(errors.new("ERR_RELOAD_FAILED", "reload",
            string.format("reload: %s (%d of %d workers replaced; the others stay)", info.reason, replaced, total),
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
