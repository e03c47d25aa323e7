--! Tollgate's lease listing: a pool's live leases, read only, at one
--! instant of Redis's own clock. Not batched with `lease.lua`, whose reply
--! is a fixed five integers per operation.
--
-- KEYS[1]  the pool: a sorted set, member = lease id, score = expiry (us)
-- KEYS[2]  the pool's weights: a hash, lease id -> weight
-- ARGV[1]  the most leases to answer
--
-- Returns {now, live, in_flight, then per lease listed: id, expiry,
-- weight}, soonest expiry first. A lease is live while now < expiry; an
-- expired one is skipped, not removed (this script writes nothing), so the
-- next lease call on the pool still removes and counts it. A pool holds at
-- most 10,000 leases (its limit), so summing every live weight is bounded;
-- HMGET goes in chunks for Lua's unpack limit.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local after = '(' .. string.format('%d', now)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], after, '+inf', 'WITHSCORES')
local max = tonumber(ARGV[1])
local live = #ids / 2
local in_flight = 0
local listed = {}
local CHUNK = 500
for first = 1, live, CHUNK do
  local last = math.min(first + CHUNK - 1, live)
  local names = {}
  for i = first, last do
    names[#names + 1] = ids[2 * i - 1]
  end
  local ws = redis.call('HMGET', KEYS[2], unpack(names))
  for j = 1, #ws do
    local w = tonumber(ws[j]) or 0
    local i = first + j - 1
    in_flight = in_flight + w
    if i <= max then
      listed[#listed + 1] = ids[2 * i - 1]
      listed[#listed + 1] = tonumber(ids[2 * i])
      listed[#listed + 1] = w
    end
  end
end
local out = {now, live, in_flight}
for i = 1, #listed do
  out[#out + 1] = listed[i]
end
return out
