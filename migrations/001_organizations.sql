-- Organizations are the customers Cloud Connector meters and entitles. An
-- organization owns one or more GitLab instances and holds a plan and add-ons.
CREATE TABLE organizations (
    id         uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    name       text        NOT NULL CHECK (name <> ''),
    plan       text        NOT NULL CHECK (plan <> ''),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE organizations IS 'Customers of Cloud Connector. One row per organization; instances and add-ons hang off it.';
COMMENT ON COLUMN organizations.id IS 'Stable organization id; appears in usage_events.organization_id and budget_counters.subject.';
COMMENT ON COLUMN organizations.name IS 'Human-readable name, for reports only.';
COMMENT ON COLUMN organizations.plan IS 'GitLab license type of the organization: free, premium or ultimate. Policy data (policies/plans) says what each plan gets.';
COMMENT ON COLUMN organizations.created_at IS 'When the organization was registered.';
COMMENT ON COLUMN organizations.updated_at IS 'When plan or name last changed.';

CREATE TABLE organization_add_ons (
    organization_id uuid        NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    add_on          text        NOT NULL CHECK (add_on <> ''),
    seats           integer     NOT NULL DEFAULT 0 CHECK (seats >= 0),
    starts_at       timestamptz NOT NULL DEFAULT now(),
    ends_at         timestamptz,
    PRIMARY KEY (organization_id, add_on),
    CHECK (ends_at IS NULL OR ends_at > starts_at)
);
COMMENT ON TABLE organization_add_ons IS 'Purchased add-ons (e.g. duo_pro, duo_enterprise). Only add-ons active now (starts_at <= now() < ends_at) entitle features.';
COMMENT ON COLUMN organization_add_ons.organization_id IS 'The organization that bought the add-on.';
COMMENT ON COLUMN organization_add_ons.add_on IS 'Add-on name as used by unit primitives in policy data, e.g. duo_pro.';
COMMENT ON COLUMN organization_add_ons.seats IS 'Number of seats purchased.';
COMMENT ON COLUMN organization_add_ons.starts_at IS 'Start of the subscription term (inclusive).';
COMMENT ON COLUMN organization_add_ons.ends_at IS 'End of the subscription term (exclusive); NULL while open-ended.';

CREATE TABLE instances (
    id              text        PRIMARY KEY CHECK (id <> ''),
    organization_id uuid        NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    realm           text        NOT NULL CHECK (realm IN ('saas', 'self-managed')),
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX instances_organization_id_idx ON instances (organization_id);
COMMENT ON TABLE instances IS 'GitLab instances (self-managed, Dedicated or GitLab.com) and the organization each belongs to.';
COMMENT ON COLUMN instances.id IS 'GitLab instance id: the token''s sub claim and the X-Gitlab-Instance-Id header.';
COMMENT ON COLUMN instances.organization_id IS 'Owning organization.';
COMMENT ON COLUMN instances.realm IS 'saas for GitLab.com, self-managed for self-managed and Dedicated instances.';
COMMENT ON COLUMN instances.created_at IS 'When the instance was registered.';

---- create above / drop below ----

DROP TABLE instances;
DROP TABLE organization_add_ons;
DROP TABLE organizations;
