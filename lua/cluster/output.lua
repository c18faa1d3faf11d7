--- Worker output, line by line: with `silent`, each complete line a worker writes
-- reaches the master as `'output'(worker, stream, line)`; a supervisor prints it by
-- default with the worker's id in front, each line in one write so lines never mix.
-- @module cluster.output
local M = {}

--- The longest line kept whole (bytes); a longer one arrives in pieces of this size.
M.MAX_LINE = 1024 * 1024

--- Installs the line splitter as the master's handler of silent workers' output.
function M.install(cluster)
  local partial = {}   -- worker -> {stdout = {pieces of the unfinished line}, stderr = {...}}

  local MAX = M.MAX_LINE

  -- a line longer than MAX goes out in pieces of MAX bytes (the last one shorter)
  local function emit_line(worker, stream, line)
    for at = 1, math.max(#line, 1), MAX do
      cluster:emit("output", worker, stream, line:sub(at, at + MAX - 1))
    end
  end

  -- The unfinished line so far, once past MAX bytes: its first pieces of MAX bytes go
  -- out, the rest (1 to MAX bytes) stays unfinished.
  local function cut(worker, stream, pieces)
    local line = table.concat(pieces)
    local keep = (#line - 1) % MAX + 1
    emit_line(worker, stream, line:sub(1, #line - keep))
    return { line:sub(-keep), size = keep }
  end

  cluster._onWorkerOutput = function(worker, stream, chunk)
    local parts = partial[worker]
    if not parts then
      parts = {}
      partial[worker] = parts
    end
    local pieces = parts[stream]
    if chunk == nil then
      -- end of the stream: an unfinished last line is still a line
      parts[stream] = nil
      if pieces and #pieces > 0 then emit_line(worker, stream, table.concat(pieces)) end
      if next(parts) == nil then partial[worker] = nil end
      return
    end
    local start = 1
    local nl = chunk:find("\n", 1, true)
    if nl and pieces and #pieces > 0 then
      -- the end of a line that came in pieces: joined once, so a long line costs its
      -- length, not its length times the number of chunks
      pieces[#pieces + 1] = chunk:sub(1, nl - 1)
      parts[stream] = nil
      emit_line(worker, stream, table.concat(pieces))
      pieces = nil
      start = nl + 1
      nl = chunk:find("\n", start, true)
    end
    while nl do
      emit_line(worker, stream, chunk:sub(start, nl - 1))
      start = nl + 1
      nl = chunk:find("\n", start, true)
    end
    if start <= #chunk then
      pieces = parts[stream] or { size = 0 }
      parts[stream] = pieces
      local rest = chunk:sub(start)
      pieces[#pieces + 1] = rest
      pieces.size = pieces.size + #rest
      -- a worker that never ends its line can't grow the master without bound
      if pieces.size > MAX then parts[stream] = cut(worker, stream, pieces) end
    end
  end
end

--- The default printer: "[worker 3] line" on the master's stdout or stderr.
function M.prefixed(worker, stream, line)
  local out = stream == "stderr" and io.stderr or io.stdout
  out:write(string.format("[worker %d] %s\n", worker.id, line))
  out:flush()
end

return M
