-- Busted output handler: gtest-style lines while the specs run, then the one
-- closing line CI reads: "busted: N passed, N failed" (errors count as failed).
return function(options)
  local busted = require 'busted'
  local gtest = require 'busted.outputHandlers.gtest'(options)
  local handler = require 'busted.outputHandlers.base'()

  local function summary()
    local passed = handler.successesCount
    local failed = handler.failuresCount + handler.errorsCount
    io.write(string.format("busted: %d passed, %d failed\n", passed, failed))
    io.flush()
    return nil, true
  end

  handler:subscribe(options)
  busted.subscribe({ 'suite', 'end' }, summary, { priority = -1 })
  return gtest
end
