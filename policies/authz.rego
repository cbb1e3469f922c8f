# Cloud Connector authorization policy.
#
# Input (built by the decision service):
#   token         verified token claims (iss, sub, aud, scopes, gitlab_realm, ...)
#   organization  {registered, id, name, plan, add_ons: [{name, seats}]}
#   feature       requested unit primitive
#   audience      JWT audience of the backend the gateway fronts
#   request       {method, path, instance_id, realm, global_user_id, gitlab_version,
#                  client_type, deployment_type, host_name}
#   now           RFC 3339 time of the decision
#
# Output: data.cloudconnector.authz.decision
#   {allow, reason, message, explanation: [..], budget: {bucket, limit,
#    window_seconds, unit, kind}, cache_seconds}
package cloudconnector.authz

feature := data.unit_primitives[input.feature]

now_ns := time.parse_rfc3339_ns(input.now)

unauthorized := sprintf("Unauthorized to access %s", [input.feature])

# --- Denials. Each carries a priority; the lowest priority number wins. ---

denials contains {"priority": 10, "reason": "unknown_feature", "message": unauthorized,
	"explanation": sprintf("%q is not a unit primitive in data.unit_primitives", [input.feature])} if {
	not feature
}

denials contains {"priority": 20, "reason": "wrong_backend", "message": unauthorized,
	"explanation": sprintf("%s is served by %v, not by audience %q", [input.feature, feature.backend_services, input.audience])} if {
	feature
	not served_by_audience
}

denials contains {"priority": 30, "reason": "not_in_scopes", "message": unauthorized,
	"explanation": sprintf("token scopes %v do not include %s", [token_scopes, input.feature])} if {
	feature
	not input.feature in token_scopes
}

denials contains {"priority": 40, "reason": "unknown_instance", "message": unauthorized,
	"explanation": sprintf("instance %q is not registered to an organization", [input.token.sub])} if {
	not input.organization.registered
}

denials contains {"priority": 50, "reason": "gitlab_version_invalid", "message": "Invalid X-Gitlab-Version header",
	"explanation": sprintf("X-Gitlab-Version %q is not a version", [input.request.gitlab_version])} if {
	feature.min_gitlab_version
	input.request.gitlab_version != ""
	not gitlab_version
}

denials contains {"priority": 50, "reason": "gitlab_version_too_old", "message": unauthorized,
	"explanation": sprintf("%s needs GitLab %s or later, instance runs %s", [input.feature, feature.min_gitlab_version, input.request.gitlab_version])} if {
	semver.compare(gitlab_version, feature.min_gitlab_version) < 0
}

denials contains {"priority": 60, "reason": "not_entitled", "message": unauthorized, "explanation": explain_entitlement} if {
	feature
	input.organization.registered
	not entitled
}

denials contains {"priority": 70, "reason": "feature_disabled", "message": object.get(s, "message", unauthorized),
	"explanation": sprintf("pressure-relief switch %v matches", [s])} if {
	some s in data.switches.disabled
	switch_matches(s)
}

denials contains {"priority": 80, "reason": "no_budget", "message": unauthorized,
	"explanation": sprintf("plan %q has no budget for bucket %q and no default", [input.organization.plan, bucket])} if {
	feature
	input.organization.registered
	not budget
}

# --- Entitlement ---

token_scopes := object.get(input.token, "scopes", [])

served_by_audience if {
	some name in feature.backend_services
	data.backend_services[name].jwt_aud == input.audience
}

free_access if now_ns < time.parse_rfc3339_ns(feature.cut_off_date)

active_add_ons := {a.name | some a in input.organization.add_ons}

covering_add_ons := active_add_ons & {a | some a in feature.add_ons}

licensed if input.organization.plan in feature.license_types

entitled if free_access

entitled if {
	licensed
	count(covering_add_ons) > 0
}

entitled if {
	licensed
	count(feature.add_ons) == 0
}

explain_entitlement := sprintf("plan %q (needs one of %v) with add-ons %v (needs one of %v)%s", [
	input.organization.plan, feature.license_types, active_add_ons, feature.add_ons,
	free_access_note,
])

free_access_note := sprintf("; free access ended %s", [feature.cut_off_date]) if feature.cut_off_date

else := "; no free access period"

# gitlab_version is the numeric part of X-Gitlab-Version ("17.6.1-ee" -> "17.6.1"),
# padded to major.minor.patch. Numbers with leading zeros ("016.0.0") are not
# versions: semver.compare would fail on them and leave the version checks
# undefined, which must never read as "no objection".
gitlab_version := v if {
	parts := regex.find_all_string_submatch_n(`^(0|[1-9]\d*)\.(0|[1-9]\d*)(?:\.(0|[1-9]\d*))?(?:$|[^\d.])`, input.request.gitlab_version, 1)
	count(parts) == 1
	m := parts[0]
	v := sprintf("%s.%s.%s", [m[1], m[2], patch(m[3])])
	semver.is_valid(v)
}

patch(p) := "0" if p == ""

else := p

switch_matches(s) if {
	every k, v in object.remove(s, {"message", "gitlab_version_below"}) {
		switch_field(k) == v
	}
	below_matches(s)
}

switch_field("feature") := input.feature

switch_field("organization_id") := input.organization.id

switch_field("realm") := input.request.realm

below_matches(s) if not s.gitlab_version_below

below_matches(s) if semver.compare(gitlab_version, s.gitlab_version_below) < 0

# A switch that turns off old GitLab versions also catches a request that
# hides its version (no header, or not a version): switches protect the
# service, so they fail closed. (min_gitlab_version, which protects old
# clients from answers they cannot read, applies only when the header is sent.)
below_matches(s) if {
	s.gitlab_version_below
	not gitlab_version
}

# --- Budget ---

bucket := object.get(feature, "budget_bucket", input.feature)

budget := b if {
	b := data.overrides.organizations[input.organization.id].budgets[bucket]
} else := b if {
	b := data.plans[input.organization.plan].budgets[bucket]
} else := b if {
	b := data.plans[input.organization.plan].budgets["default"]
}

budget_source := "organization override" if {
	data.overrides.organizations[input.organization.id].budgets[bucket]
} else := sprintf("plan %s", [input.organization.plan])

# --- Decision ---

first_denial := sort([[d.priority, d.reason, d] | some d in denials])[0][2]

decision := {
	"allow": false,
	"reason": first_denial.reason,
	"message": first_denial.message,
	"explanation": [first_denial.explanation],
	"cache_seconds": data.settings.decision_cache_seconds,
} if count(denials) > 0

decision := {
	"allow": true,
	"reason": "entitled",
	"message": "",
	"explanation": [
		sprintf("%s in token scopes; %s", [input.feature, entitlement_source]),
		sprintf("budget %q from %s: %d %s per %ds (%s)", [bucket, budget_source, budget.limit, budget.unit, budget.window_seconds, budget.kind]),
	],
	"budget": {
		"bucket": bucket,
		"limit": budget.limit,
		"window_seconds": budget.window_seconds,
		"unit": budget.unit,
		"kind": budget.kind,
	},
	"cache_seconds": data.settings.decision_cache_seconds,
} if count(denials) == 0

entitlement_source := sprintf("free access until %s", [feature.cut_off_date]) if free_access

else := sprintf("add-on %v on plan %s", [covering_add_ons, input.organization.plan]) if count(covering_add_ons) > 0

else := sprintf("plan %s", [input.organization.plan])
