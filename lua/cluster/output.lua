--- Worker output, line by line: with `silent`, each complete line a worker writes
-- reaches the master as `'output'(worker, stream, line)`; a supervisor prints it by
-- default with the worker's id in front, each line in one write so lines never mix.
-- @module cluster.output
local M = {}

--- Installs the line splitter as the master's handler of silent workers' output.
function M.install(cluster)
  local partial = {}   -- worker -> {stdout=, stderr=}

  cluster._onWorkerOutput = function(worker, stream, chunk)
    local parts = partial[worker]
    if not parts then
      parts = {}
      partial[worker] = parts
    end
    if chunk == nil then
      local rest = parts[stream]
      parts[stream] = nil
      if rest and rest ~= "" then cluster:emit("output", worker, stream, rest) end
      if next(parts) == nil then partial[worker] = nil end
      return
    end
    local data = (parts[stream] or "") .. chunk
    local start = 1
    while true do
      local nl = data:find("\n", start, true)
      if not nl then break end
      cluster:emit("output", worker, stream, data:sub(start, nl - 1))
      start = nl + 1
    end
    parts[stream] = data:sub(start)
  end
end

--- The default printer: "[worker 3] line" on the master's stdout or stderr.
function M.prefixed(worker, stream, line)
  local out = stream == "stderr" and io.stderr or io.stdout
  out:write(string.format("[worker %d] %s\n", worker.id, line))
  out:flush()
end

return M
