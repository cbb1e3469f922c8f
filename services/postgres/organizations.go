// Package postgres reads the decision service's data from PostgreSQL.
package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/golang-lru/v2/expirable"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/singleflight"

	"github.com/cloud-connector/cloud-connector/services/authz"
)

// DB is satisfied by *pgxpool.Pool, *pgx.Conn and pgx.Tx.
type DB interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// OrganizationsConfig configures Organizations.
type OrganizationsConfig struct {
	// CacheTTL is how long a lookup (found or not) is reused. Default 30s;
	// negative disables caching.
	CacheTTL time.Duration
	// CacheSize bounds the number of cached instances. Default 100_000.
	CacheSize int
	// QueryTimeout bounds one lookup query. Default 5s. The query is
	// shared by every caller waiting on the same instance, so it runs
	// under this timeout rather than under any one caller's context.
	QueryTimeout time.Duration
	// Registerer receives cache metrics; nil registers none.
	Registerer prometheus.Registerer
}

// Organizations resolves instances to organizations, caching results
// briefly. Concurrent lookups of one instance share a query. It is safe for
// concurrent use.
type Organizations struct {
	db      DB
	timeout time.Duration
	cache   *expirable.LRU[string, lookup]
	group   singleflight.Group
	lookup  *prometheus.CounterVec
}

type lookup struct {
	org   authz.Organization
	found bool
}

var _ authz.OrganizationFinder = (*Organizations)(nil)

// NewOrganizations returns a finder reading from db.
func NewOrganizations(db DB, cfg OrganizationsConfig) *Organizations {
	if cfg.CacheTTL == 0 {
		cfg.CacheTTL = 30 * time.Second
	}
	if cfg.CacheSize == 0 {
		cfg.CacheSize = 100_000
	}
	if cfg.QueryTimeout <= 0 {
		cfg.QueryTimeout = 5 * time.Second
	}
	o := &Organizations{
		db:      db,
		timeout: cfg.QueryTimeout,
		lookup: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cloudconnector_organization_lookups_total",
			Help: "Organization lookups by result (hit, miss).",
		}, []string{"result"}),
	}
	if cfg.CacheTTL > 0 {
		o.cache = expirable.NewLRU[string, lookup](cfg.CacheSize, nil, cfg.CacheTTL)
	}
	if cfg.Registerer != nil {
		cfg.Registerer.MustRegister(o.lookup)
	}
	return o
}

// FindByInstance returns the organization instanceID belongs to, with the
// add-ons active now, or authz.ErrNotFound.
func (o *Organizations) FindByInstance(ctx context.Context, instanceID string) (authz.Organization, error) {
	if o.cache != nil {
		if l, ok := o.cache.Get(instanceID); ok {
			o.lookup.WithLabelValues("hit").Inc()
			return l.result()
		}
	}
	o.lookup.WithLabelValues("miss").Inc()
	ch := o.group.DoChan(instanceID, func() (any, error) {
		// Not the first caller's context: its client leaving must not fail
		// the others waiting on the same query.
		qctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), o.timeout)
		defer cancel()
		l, err := o.query(qctx, instanceID)
		if err != nil {
			return nil, err
		}
		if o.cache != nil {
			o.cache.Add(instanceID, l)
		}
		return l, nil
	})
	select {
	case <-ctx.Done():
		return authz.Organization{}, fmt.Errorf("find organization of instance: %w", context.Cause(ctx))
	case r := <-ch:
		if r.Err != nil {
			return authz.Organization{}, r.Err
		}
		return r.Val.(lookup).result()
	}
}

func (l lookup) result() (authz.Organization, error) {
	if !l.found {
		return authz.Organization{}, authz.ErrNotFound
	}
	return l.org, nil
}

const findByInstanceSQL = `
SELECT o.id::text, o.name, o.plan, i.realm, a.add_on, a.seats
FROM instances i
JOIN organizations o ON o.id = i.organization_id
LEFT JOIN organization_add_ons a
       ON a.organization_id = o.id
      AND a.starts_at <= now()
      AND (a.ends_at IS NULL OR a.ends_at > now())
WHERE i.id = $1
ORDER BY a.add_on`

func (o *Organizations) query(ctx context.Context, instanceID string) (lookup, error) {
	rows, err := o.db.Query(ctx, findByInstanceSQL, instanceID)
	if err != nil {
		return lookup{}, fmt.Errorf("query organization of instance: %w", err)
	}
	defer rows.Close()
	var l lookup
	for rows.Next() {
		var (
			addOn *string
			seats *int32
		)
		if err := rows.Scan(&l.org.ID, &l.org.Name, &l.org.Plan, &l.org.InstanceRealm, &addOn, &seats); err != nil {
			return lookup{}, fmt.Errorf("scan organization: %w", err)
		}
		l.found = true
		if addOn != nil {
			l.org.AddOns = append(l.org.AddOns, authz.AddOn{Name: *addOn, Seats: int(*seats)})
		}
	}
	if err := rows.Err(); err != nil {
		return lookup{}, fmt.Errorf("read organization rows: %w", err)
	}
	return l, nil
}

// Seed is a demo or test organization with its instances and add-ons.
type Seed struct {
	// ID fixes the organization id of a new organization; empty: generated.
	ID        string
	Name      string
	Plan      string
	Instances []SeedInstance
	AddOns    []authz.AddOn
}

// SeedInstance is an instance of a Seed organization.
type SeedInstance struct {
	ID    string
	Realm string
}

// Upsert creates or updates s's organization (matched by ID if set, else by
// name), its instances and its open-ended add-ons, and returns the
// organization id.
func Upsert(ctx context.Context, db interface {
	Begin(ctx context.Context) (pgx.Tx, error)
}, s Seed) (string, error) {
	if s.Name == "" || s.Plan == "" {
		return "", errors.New("seed: name and plan are required")
	}
	tx, err := db.Begin(ctx)
	if err != nil {
		return "", fmt.Errorf("seed: begin: %w", err)
	}
	defer tx.Rollback(ctx)
	var id string
	if s.ID != "" {
		err = tx.QueryRow(ctx, `SELECT id::text FROM organizations WHERE id = $1`, s.ID).Scan(&id)
	} else {
		err = tx.QueryRow(ctx, `SELECT id::text FROM organizations WHERE name = $1`, s.Name).Scan(&id)
	}
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		err = tx.QueryRow(ctx, `INSERT INTO organizations (id, name, plan) VALUES (coalesce($3::uuid, gen_random_uuid()), $1, $2)
			RETURNING id::text`, s.Name, s.Plan, nullIfEmpty(s.ID)).Scan(&id)
	case err == nil:
		_, err = tx.Exec(ctx, `UPDATE organizations SET name = $2, plan = $3, updated_at = now() WHERE id = $1`, id, s.Name, s.Plan)
	}
	if err != nil {
		return "", fmt.Errorf("seed organization: %w", err)
	}
	for _, in := range s.Instances {
		if _, err := tx.Exec(ctx, `INSERT INTO instances (id, organization_id, realm) VALUES ($1, $2, $3)
			ON CONFLICT (id) DO UPDATE SET organization_id = EXCLUDED.organization_id, realm = EXCLUDED.realm`,
			in.ID, id, in.Realm); err != nil {
			return "", fmt.Errorf("seed instance %s: %w", in.ID, err)
		}
	}
	for _, a := range s.AddOns {
		if _, err := tx.Exec(ctx, `INSERT INTO organization_add_ons (organization_id, add_on, seats, starts_at) VALUES ($1, $2, $3, now() - interval '1 day')
			ON CONFLICT (organization_id, add_on) DO UPDATE SET seats = EXCLUDED.seats, ends_at = NULL`,
			id, a.Name, a.Seats); err != nil {
			return "", fmt.Errorf("seed add-on %s: %w", a.Name, err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return "", fmt.Errorf("seed: commit: %w", err)
	}
	return id, nil
}

func nullIfEmpty(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}
