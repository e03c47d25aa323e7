--! Concurrency pools: the functions lease.lua and decide.lua share. The
--! Rust side sends this file in front of each of them (one Redis script
--! cannot call another). src/store/lease.rs is the reference.
--
-- A pool is two keys in the slot of its scope's buckets: a sorted set
-- (member = lease id, score = its expiry in microseconds of Redis's clock)
-- and a hash (lease id -> weight, and the field '' -> the sum of the live
-- weights; no lease id is empty). A lease is live while now < its expiry.
--
-- pool_fns(now) makes the functions on first use, once per script call:
-- each function defined at the top level would be a closure made on every
-- call, and most decide.lua calls carry no lease.
--
-- Numbers pass to Redis through string.format('%d'): Lua's own conversion
-- prints 14 significant digits, and microsecond instants have 16.
local pool_fns_made = nil
local function pool_fns(now)
  if pool_fns_made then
    return pool_fns_made
  end
  local function int(n)
    return string.format('%d', n)
  end

  -- Drops every lease expired at now, with its weight, in chunks: a pool
  -- may hold 10,000 leases that all expired together, and Lua's unpack has
  -- a limit on the values it hands over at once. Returns how many. Reads
  -- both keys before its first write, so a key of another type fails it
  -- having changed nothing.
  local CHUNK = 500
  local function expire(pool, weights)
    local expired = redis.call('ZRANGEBYSCORE', pool, '-inf', int(now))
    if #expired == 0 then
      return 0
    end
    local gone = 0
    for first = 1, #expired, CHUNK do
      local last = math.min(first + CHUNK - 1, #expired)
      local ws = redis.call('HMGET', weights, unpack(expired, first, last))
      for i = 1, #ws do
        gone = gone + (tonumber(ws[i]) or 0)
      end
      redis.call('HDEL', weights, unpack(expired, first, last))
    end
    redis.call('ZREMRANGEBYSCORE', pool, '-inf', int(now))
    if gone > 0 then
      redis.call('HINCRBY', weights, '', int(-gone))
    end
    return #expired
  end

  -- Judges an acquire of `id` (expired leases removed before): returns
  -- room (the id is live, or its weight and reserve fit beside the live
  -- weight), the live id's expiry (nil when not live), the live weight,
  -- and for no room whose weight could ever fit the earliest live expiry
  -- (else -1).
  local function judge(pool, weights, id, limit, weight, reserve)
    local in_flight = tonumber(redis.call('HGET', weights, '') or '0')
    local held = redis.call('ZSCORE', pool, id)
    if held then
      return true, tonumber(held), in_flight, -1
    end
    if in_flight + weight + reserve <= limit then
      return true, nil, in_flight, -1
    end
    local earliest = -1
    if weight + reserve <= limit then
      local first = redis.call('ZRANGE', pool, 0, 0, 'WITHSCORES')
      if #first == 2 then
        earliest = tonumber(first[2])
      end
    end
    return false, nil, in_flight, earliest
  end

  -- Records a lease in a pool whose live weight was `was`; returns the
  -- live weight after it. Both keys then live at least as long as the new
  -- lease, without reading the pool's latest expiry: a pool that held no
  -- live lease takes the new one's expiry; one that did already expires
  -- with its latest lease (every change sets it), so its expiry only
  -- grows (GT), and a key with leases always has one.
  local function add(pool, weights, id, at, weight, was)
    redis.call('ZADD', pool, int(at), id)
    redis.call('HSET', weights, id, int(weight))
    local in_flight = redis.call('HINCRBY', weights, '', int(weight))
    local ms = int(math.ceil((at - now) / 1000))
    if was == 0 then
      redis.call('PEXPIRE', pool, ms)
      redis.call('PEXPIRE', weights, ms)
    else
      redis.call('PEXPIRE', pool, ms, 'GT')
      redis.call('PEXPIRE', weights, ms, 'GT')
    end
    return in_flight
  end

  -- Keeps both keys exactly as long as the latest live lease, or deletes
  -- an empty pool, after a change that may shorten it (a renew, a
  -- release, expired leases removed). Returns the live weight (0 once
  -- deleted).
  local function keep(pool, weights, in_flight)
    local last = redis.call('ZRANGE', pool, -1, -1, 'WITHSCORES')
    if #last == 2 then
      local ms = math.ceil((tonumber(last[2]) - now) / 1000)
      redis.call('PEXPIRE', pool, int(ms))
      redis.call('PEXPIRE', weights, int(ms))
      return in_flight
    end
    redis.call('DEL', pool, weights)
    return 0
  end

  pool_fns_made = { int = int, expire = expire, judge = judge, add = add, keep = keep }
  return pool_fns_made
end
