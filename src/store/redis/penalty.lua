--! The penalty box's operator side: ban, unban and list, on Redis's own
--! clock. The charge side (strikes, bans started by them) is the section
--! "The penalty box" of decide.lua; src/store/penalty.rs is the reference.
--
-- KEYS[1]  ban, unban: the caller's record, '<prefix>{<scope>}:%pen:<id>:<op>',
--          '<i8i8i8i8i8' (window start, strikes, level, ban until, last
--          strike); list: the scope's index
-- KEYS[2]  ban, unban: the scope's index of bans, '<prefix>{<scope>}:%bans',
--          a sorted set: member the record key's caller part (after
--          ':%pen:'), score the ban's end in microseconds. Both keys share
--          the scope's hash slot.
-- ARGV[1]  'ban', 'unban' or 'list'
-- ARGV[2]  ban: the ban's length, µs; list: how many to skip; unban: 0
-- ARGV[3]  ban: how long the record outlives the ban (the scope's
--          forgive_after), µs; list: the most to return; unban: 0
-- ARGV[4]  ban, unban: the channel every replica's ban cache listens on,
--          '<prefix>%bans:changed' (see redis/invalidation.rs)
-- ARGV[5]  ban, unban: the message, '<scope>\n<identity>\n<operation>'
--          (operation empty for a box per identity), published there in
--          the same atomic step as the change
--
-- Clock: "now" is Redis's TIME in microseconds.
--
-- Returns ban {now, until}; unban {now, 1 when a ban was in force, else 0};
-- list {now, total, then per ban: member, until}, bans ordered by their end
-- then member, after dropping ended ones from the index.

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

if op == 'list' then
  local index = KEYS[1]
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
  local total = redis.call('ZCARD', index)
  local page = redis.call('ZRANGEBYSCORE', index, '(' .. now, '+inf', 'WITHSCORES',
    'LIMIT', tonumber(ARGV[2]), tonumber(ARGV[3]))
  local out = { now, total }
  for i = 1, #page, 2 do
    out[#out + 1] = page[i]
    out[#out + 1] = tonumber(page[i + 1])
  end
  return out
end

local key, index = KEYS[1], KEYS[2]
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
redis.call('PUBLISH', ARGV[4], ARGV[5])
return { now, untl }
