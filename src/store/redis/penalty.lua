--! The penalty box's operator side: ban, unban and list, on Redis's own
--! clock. The charge side (strikes, bans started by them) is the section
--! "The penalty box" of decide.lua; src/store/penalty.rs is the reference.
--
-- KEYS[1]  ban, unban: the caller's record, '<prefix>{<scope>}:%pen:<id>:<op>',
--          '<i8i8i8i8i8' (window start, strikes, level, ban until, last
--          strike); list: the scope's index
-- KEYS[2]  ban, unban: the scope's index of bans, '<prefix>{<scope>}:%bans',
--          a sorted set: member the record key's caller part (after
--          ':%pen:'), score the ban's end in microseconds; list: the
--          scope's reasons (KEYS[3])
-- KEYS[3]  ban, unban: the scope's reasons, '<prefix>{<scope>}:%bans:why',
--          a hash: field the index's member, value '<until>:<reason>' of
--          the operator's ban that set it (naming no later ban). Every key
--          shares the scope's hash slot.
-- ARGV[1]  'ban', 'unban' or 'list'
-- ARGV[2]  ban: the ban's length, µs; list: the end (score) of the ban
--          the page resumes after, '' for the first page; unban: 0
-- ARGV[3]  ban: how long the record outlives the ban (the scope's
--          forgive_after), µs; list: the most to return; unban: 0
-- ARGV[4]  ban, unban: the channel every replica's ban cache listens on,
--          '<prefix>%bans:changed' (see redis/invalidation.rs); list: the
--          member the page resumes after
-- ARGV[5]  ban, unban: the message, '<scope>\n<identity>\n<operation>'
--          (operation empty for a box per identity), published there in
--          the same atomic step as the change
-- ARGV[6]  ban: the operator's reason, '' for none
--
-- Clock: "now" is Redis's TIME in microseconds.
--
-- Returns ban {now, until}; unban {now, 1 when a ban was in force, else 0};
-- list {now, total, more, then per ban: member, until, reason}, bans ordered by
-- their end then member, after dropping ended ones from the index; more is
-- 1 when bans follow the page.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local op = ARGV[1]

local function px(us)
  local ms = math.floor((us + 999) / 1000)
  if ms < 1 then
    ms = 1
  end
  return ms
end

-- True when a <= b byte by byte, as Redis orders the members of one
-- score (Lua's own comparison follows the server's locale).
local function bytes_le(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x < y
    end
  end
  return #a <= #b
end

-- The rank of the first ban after (score, member) in the index's order.
local function rank_after(index, score, member)
  local have = redis.call('ZSCORE', index, member)
  if have and tonumber(have) == score then
    return redis.call('ZRANK', index, member) + 1
  end
  -- That ban is gone (ended, lifted, replaced): count those before it.
  -- Lua's '..' would print the score in 14 digits: format it whole.
  local rank = redis.call('ZCOUNT', index, '-inf', string.format('(%d', score))
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', index, score, score)) do
    if bytes_le(m, member) then
      rank = rank + 1
    end
  end
  return rank
end

if op == 'list' then
  local index = KEYS[1]
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
  local total = redis.call('ZCARD', index)
  local limit = tonumber(ARGV[3])
  local from = 0
  if ARGV[2] ~= '' then
    from = rank_after(index, tonumber(ARGV[2]), ARGV[4])
  end
  local page = {}
  if limit > 0 then
    page = redis.call('ZRANGE', index, from, from + limit, 'WITHSCORES')
  end
  local more = 0
  if #page > 2 * limit then
    more = 1
  end
  local out = { now, total, more }
  for i = 1, math.min(#page, 2 * limit), 2 do
    local until_us = tonumber(page[i + 1])
    local why = redis.call('HGET', KEYS[2], page[i])
    local reason = ''
    if why then
      local at, text = string.match(why, '^(%d+):(.*)$')
      if at and tonumber(at) == until_us then
        reason = text
      end
    end
    out[#out + 1] = page[i]
    out[#out + 1] = until_us
    out[#out + 1] = reason
  end
  return out
end

local key, index, reasons = KEYS[1], KEYS[2], KEYS[3]
local member = string.match(key, '.*:%%pen:(.*)$') or key
local v = redis.call('GET', key)
local rec = { 0, 0, 0, 0, 0 }
if v and #v == 40 then
  local a, b, c, d, e = struct.unpack('<i8i8i8i8i8', v)
  rec = { a, b, c, d, e }
end

if op == 'unban' then
  redis.call('DEL', key)
  redis.call('ZREM', index, member)
  redis.call('HDEL', reasons, member)
  redis.call('PUBLISH', ARGV[4], ARGV[5])
  return { now, rec[4] > now and 1 or 0 }
end

-- ban
local untl = now + tonumber(ARGV[2])
rec[4] = untl
redis.call('SET', key, struct.pack('<i8i8i8i8i8', rec[1], rec[2], rec[3], rec[4], rec[5]),
  'PX', px(untl - now + tonumber(ARGV[3])))
redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
redis.call('ZADD', index, untl, member)
if redis.call('PTTL', index) < px(untl - now) then
  redis.call('PEXPIRE', index, px(untl - now))
end
-- A reason lives until the latest ban of the scope ends, like the index.
if ARGV[6] ~= '' then
  redis.call('HSET', reasons, member, string.format('%d:%s', untl, ARGV[6]))
  if redis.call('PTTL', reasons) < px(untl - now) then
    redis.call('PEXPIRE', reasons, px(untl - now))
  end
else
  redis.call('HDEL', reasons, member)
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return { now, untl }
