--- Signals as events on the cluster module: `cluster.on("SIGUSR2", fn)` handles a signal
-- in the master (Node's process.on("SIGINT")). A signal that has listeners no longer gets
-- its default action (the supervisor's defaults, or the system's). Watchers do not keep
-- the loop alive.
-- @module cluster.signals
local core = require "cluster.core"

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

  local function update(name)
    local wanted = has_listeners(name) or defaults[name] ~= nil
    if wanted and not watchers[name] then
      local w, msg = core.signal(name, dispatch)
      if not w then error("cluster.on: cannot watch " .. name .. ": " .. tostring(msg), 4) end
      w:unref()
      watchers[name] = w
    elseif not wanted and watchers[name] then
      watchers[name]:close()
      watchers[name] = nil
    end
  end

  local previous_new, previous_remove = rawget(cluster, "_onNewListener"), rawget(cluster, "_onRemoveListener")
  rawset(cluster, "_onNewListener", function(self, name)
    if type(name) == "string" and name:match("^SIG%u+%d*$") then update(name) end
    if previous_new then previous_new(self, name) end
  end)
  rawset(cluster, "_onRemoveListener", function(self, name)
    if type(name) == "string" and name:match("^SIG%u+%d*$") then update(name) end
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
