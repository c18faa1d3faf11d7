--- Signals as events on the cluster module: `cluster.on("SIGUSR2", fn)` handles a signal
-- in the master (Node's process.on("SIGINT")). A signal that has listeners no longer gets
-- its default action (the supervisor's defaults, or the system's). Watchers do not keep
-- the loop alive.
-- @module cluster.signals
local core = require "cluster.core"
local errors = require "cluster.errors"

local M = {}

function M.install(cluster)
  local watchers = {}   -- name -> core.signal handle
  local defaults = {}   -- name -> function(name), the supervisor's default actions

  local function has_listeners(name) return cluster:listenerCount(name) > 0 end

  local function dispatch(name)
    if has_listeners(name) then
      cluster:emit(name, name)
    elseif defaults[name] then
      defaults[name](name)
    end
  end

  -- Watches the signal while it has listeners or a default action; true, or nil and
  -- the reason when it cannot be watched (SIGKILL, SIGSTOP).
  local function update(name)
    local wanted = has_listeners(name) or defaults[name] ~= nil
    if wanted and not watchers[name] then
      local w, msg = core.signal(name, dispatch)
      if not w then return nil, msg end
      w:unref()
      watchers[name] = w
    elseif not wanted and watchers[name] then
      watchers[name]:close()
      watchers[name] = nil
    end
    return true
  end

  -- An event named after a signal this system knows (as Node: "SIGFOO" is an event
  -- like any other)
  local function is_signal(name)
    return type(name) == "string" and name:match("^SIG%u+%d*$") and core.signal_number(name) ~= nil
  end

  local previous_new, previous_remove = rawget(cluster, "_onNewListener"), rawget(cluster, "_onRemoveListener")
  rawset(cluster, "_onNewListener", function(self, name, fn)
    if is_signal(name) then
      local ok, msg = update(name)
      if not ok then -- the listener could never run: not kept
        self:off(name, fn)
        errors.raise("cluster.on: bad argument #1 (event name): cannot watch " .. name .. ": " .. tostring(msg))
      end
    end
    if previous_new then previous_new(self, name, fn) end
  end)
  rawset(cluster, "_onRemoveListener", function(self, name)
    if is_signal(name) then update(name) end
    if previous_remove then previous_remove(self, name) end
  end)

  --- Sets (or with nil, clears) the default action for a signal, used when no
  -- listener handles it. Internal: the supervisor's SIGTERM/SIGINT/SIGHUP/SIGTTIN/SIGTTOU.
  function cluster._setSignalDefault(name, fn)
    defaults[name] = fn
    update(name)
  end

  --- Drops the supervisor's default actions (after a shutdown); signals the script
  -- listens for stay watched.
  function cluster._closeSignals()
    local names = {}
    for name in pairs(defaults) do names[#names + 1] = name end
    defaults = {}
    for _, name in ipairs(names) do update(name) end
  end
end

return M
