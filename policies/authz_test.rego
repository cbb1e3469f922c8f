package cloudconnector.authz_test

import data.cloudconnector.authz

org := {
	"registered": true,
	"id": "11111111-1111-1111-1111-111111111111",
	"name": "Acme",
	"plan": "premium",
	"add_ons": [{"name": "duo_pro", "seats": 10}],
}

base := {
	"token": {"iss": "https://customers.gitlab.com", "sub": "inst-1", "aud": ["gitlab-ai-gateway"], "gitlab_realm": "self-managed", "scopes": ["complete_code", "duo_chat", "documentation_search"]},
	"organization": org,
	"feature": "complete_code",
	"audience": "gitlab-ai-gateway",
	"request": {"method": "POST", "path": "/v2/code/completions", "instance_id": "inst-1", "realm": "self-managed", "gitlab_version": "17.6.1-ee"},
	"now": "2026-11-22T10:00:00Z",
}

# with_input replaces whole top-level keys of base (object.union would merge deeply).
with_input(patch) := object.union(object.remove(base, object.keys(patch)), patch)

test_allowed_by_add_on if {
	d := authz.decision with input as base
	d.allow
	d.reason == "entitled"
	d.budget == {"bucket": "code_suggestions", "limit": 600, "window_seconds": 60, "unit": "request", "kind": "rate"}
	contains(d.explanation[0], "duo_pro")
	d.cache_seconds == 30
}

test_features_share_a_bucket if {
	d := authz.decision with input as with_input({"feature": "documentation_search"})
	d.allow
	d.budget.bucket == "duo_chat"
	d.budget.limit == 120
}

test_free_access_before_cut_off if {
	no_add_ons := object.union(org, {"add_ons": []})
	d := authz.decision with input as with_input({"organization": no_add_ons, "now": "2024-01-10T00:00:00Z"})
	d.allow
	contains(d.explanation[0], "free access until")
}

test_not_entitled_after_cut_off_without_add_on if {
	no_add_ons := object.union(org, {"add_ons": []})
	d := authz.decision with input as with_input({"organization": no_add_ons})
	not d.allow
	d.reason == "not_entitled"
	d.message == "Unauthorized to access complete_code"
}

test_not_entitled_on_plan_without_license if {
	free := object.union(org, {"plan": "free"})
	d := authz.decision with input as with_input({"organization": free})
	d.reason == "not_entitled"
}

test_plan_alone_entitles_when_no_add_ons_needed if {
	d := authz.decision with input as with_input({
		"feature": "ci_hosted_runners",
		"audience": "gitlab-cicd",
		"token": object.union(base.token, {"scopes": ["ci_hosted_runners"]}),
	})
	d.allow
	d.budget.kind == "quota"
	d.budget.window_seconds == 2592000
}

test_scope_missing if {
	d := authz.decision with input as with_input({"feature": "generate_code"})
	not d.allow
	d.reason == "not_in_scopes"
}

test_token_without_scopes if {
	d := authz.decision with input as with_input({"token": object.remove(base.token, {"scopes"})})
	d.reason == "not_in_scopes"
}

test_unknown_feature if {
	d := authz.decision with input as with_input({"feature": "teleport"})
	not d.allow
	d.reason == "unknown_feature"
	d.message == "Unauthorized to access teleport"
}

test_wrong_backend if {
	d := authz.decision with input as with_input({"audience": "gitlab-cicd"})
	d.reason == "wrong_backend"
}

test_unknown_instance if {
	d := authz.decision with input as with_input({"organization": {"registered": false}})
	not d.allow
	d.reason == "unknown_instance"
}

test_gitlab_version_too_old if {
	d := authz.decision with input as with_input({"request": object.union(base.request, {"gitlab_version": "16.7.9"})})
	d.reason == "gitlab_version_too_old"
}

test_gitlab_version_two_parts_ok if {
	d := authz.decision with input as with_input({"request": object.union(base.request, {"gitlab_version": "16.8"})})
	d.allow
}

test_gitlab_version_missing_is_not_checked if {
	d := authz.decision with input as with_input({"request": object.union(base.request, {"gitlab_version": ""})})
	d.allow
}

test_gitlab_version_garbage if {
	d := authz.decision with input as with_input({"request": object.union(base.request, {"gitlab_version": "latest"})})
	d.reason == "gitlab_version_invalid"
	d.message == "Invalid X-Gitlab-Version header"
}

# Leading zeros are not versions; reading them as one must not skip the check.
test_gitlab_version_leading_zeros_are_invalid if {
	every v in ["016.0.0", "16.00.0", "16.7.09", "17.6.1.2", "17..6"] {
		d := authz.decision with input as with_input({"request": object.union(base.request, {"gitlab_version": v})})
		not d.allow
		d.reason == "gitlab_version_invalid"
	}
}

test_gitlab_version_suffixes_ok if {
	every v in ["17.6.1-ee", "17.6.0-pre", "17.6 ee", "18.0.0"] {
		d := authz.decision with input as with_input({"request": object.union(base.request, {"gitlab_version": v})})
		d.allow
	}
}

test_switch_disables_feature_for_realm if {
	switches := {"disabled": [{"feature": "complete_code", "realm": "self-managed", "message": "Code Suggestions is paused"}]}
	d := authz.decision with input as base with data.switches as switches
	not d.allow
	d.reason == "feature_disabled"
	d.message == "Code Suggestions is paused"
}

test_switch_for_other_realm_does_not_match if {
	switches := {"disabled": [{"feature": "complete_code", "realm": "saas"}]}
	d := authz.decision with input as base with data.switches as switches
	d.allow
}

test_switch_by_version_range if {
	switches := {"disabled": [{"gitlab_version_below": "17.7.0"}]}
	d := authz.decision with input as base with data.switches as switches
	d.reason == "feature_disabled"
	d2 := authz.decision with input as with_input({"request": object.union(base.request, {"gitlab_version": "17.8.0"})})
		with data.switches as switches
	d2.allow
}

# A version switch protects the service: a request that hides its version
# (none, or not a version) is caught by it too.
test_switch_by_version_range_fails_closed if {
	switches := {"disabled": [{"feature": "complete_code", "gitlab_version_below": "17.7.0"}]}
	every v in ["", "016.0.0", "latest"] {
		d := authz.decision with input as with_input({"request": object.union(base.request, {"gitlab_version": v})})
			with data.switches as switches
		not d.allow
	}
	d := authz.decision with input as with_input({"request": object.union(base.request, {"gitlab_version": ""})})
		with data.switches as switches
	d.reason == "feature_disabled"
}

test_organization_override_wins if {
	overrides := {"organizations": {org.id: {"budgets": {"code_suggestions": {"limit": 5, "window_seconds": 60, "unit": "request", "kind": "rate"}}}}}
	d := authz.decision with input as base with data.overrides as overrides
	d.budget.limit == 5
	contains(d.explanation[1], "organization override")
}

test_plan_default_budget if {
	d := authz.decision with input as with_input({
		"feature": "ci_job_analysis",
		"audience": "gitlab-cicd",
		"organization": object.union(org, {"plan": "ultimate", "add_ons": [{"name": "duo_enterprise", "seats": 1}]}),
		"token": object.union(base.token, {"scopes": ["ci_job_analysis"]}),
	})
	d.allow
	d.budget.bucket == "ci_job_analysis"
	d.budget.limit == 120
}

test_no_budget_denies if {
	d := authz.decision with input as base with data.plans as {"premium": {"budgets": {}}}
	d.reason == "no_budget"
}

test_first_denial_by_priority if {
	# Unknown instance and missing scope: the scope is reported first.
	d := authz.decision with input as with_input({"feature": "generate_code", "organization": {"registered": false}})
	d.reason == "not_in_scopes"
}

test_every_unit_primitive_names_known_backends if {
	every _, up in data.unit_primitives {
		every svc in up.backend_services {
			data.backend_services[svc].jwt_aud
		}
	}
}

test_every_plan_budget_is_well_formed if {
	every _, plan in data.plans {
		every _, b in plan.budgets {
			b.limit >= 0
			b.window_seconds > 0
			b.kind in {"rate", "quota"}
			b.unit != ""
		}
	}
}
