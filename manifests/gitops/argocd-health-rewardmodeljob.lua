-- Argo CD health check for rmjob.dev/RewardModelJob
-- (resource.customizations.health.rmjob.dev_RewardModelJob in argocd-cm).
--
-- Healthy: Succeeded. Progressing: no status yet, Pending, Running, or a spec edit the operator
-- has not looked at (status.observedGeneration behind metadata.generation). Suspended:
-- Suspended. Degraded: Failed (an invalid spec included: phase Failed + condition InvalidSpec),
-- or a spec edit the operator refused (condition SpecChangeRefused) -- git then says something
-- the running job does not do.

local function true_condition(status, type_)
  for _, condition in ipairs(status.conditions or {}) do
    if condition.type == type_ and condition.status == "True" then
      return condition
    end
  end
  return nil
end

local function progress(status)
  local metrics = status.metrics or {}
  if metrics.step ~= nil and metrics.totalSteps ~= nil then
    return string.format("step %d/%d", metrics.step, metrics.totalSteps)
  end
  return nil
end

local function health(obj)
  local status = obj.status
  if status == nil or status.phase == nil then
    return "Progressing", "waiting for the operator"
  end
  local phase = status.phase
  local message = status.message or ""

  -- Failures first: a refused edit never moves observedGeneration, and Failed is terminal.
  local invalid = true_condition(status, "InvalidSpec")
  if invalid ~= nil then
    return "Degraded", "InvalidSpec: " .. (invalid.message or message)
  end
  if phase == "Failed" then
    return "Degraded", message
  end
  local refused = true_condition(status, "SpecChangeRefused")
  if refused ~= nil then
    return "Degraded", "SpecChangeRefused: " .. (refused.message or "")
  end

  local generation = obj.metadata and obj.metadata.generation
  if generation ~= nil and (status.observedGeneration or 0) < generation then
    return "Progressing", string.format("waiting for the operator to observe generation %d", generation)
  end
  if phase == "Succeeded" then
    return "Healthy", message
  end
  if phase == "Suspended" then
    return "Suspended", message
  end
  if phase == "Pending" or phase == "Running" then
    return "Progressing", progress(status) or message
  end
  return "Unknown", "unknown phase " .. tostring(phase)
end

local hs = {}
hs.status, hs.message = health(obj)
return hs
