//! What does the admin API look like to a client? Its OpenAPI 3.1 document, served at
//! `/admin/v1/openapi.json`, built from the handlers' own `#[utoipa::path]` attributes and
//! the types they answer with. The router registers each handler at the path its attribute
//! names (`super::routes`), so the document and what is served are one list; this module
//! adds what is true of the whole API (its bearer scheme, and the answers of the middleware
//! in front of the handlers) and must never describe a route by hand.

use super::Routes;
use crate::error::ApiErrorBody;
use axum::body::Bytes;
use axum::response::IntoResponse;
use std::sync::OnceLock;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi as _, ToSchema};
use utoipa_axum::router::OpenApiRouter;

/// The name the bearer scheme goes by in the document.
const BEARER: &str = "bearer";

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Sluice admin API",
        description = "Operate a Sluice gateway: API keys, tenants, tiers, the backend pool, \
                       usage and billing, the response cache, spend alerts, distillation \
                       datasets and the audit trail. Every call but `/health` and `/console` \
                       needs the admin token or an admin JWT; the viewer role may only read.",
    ),
    tags(
        (name = "keys", description = "API keys (the secret is shown once, on create and rotate) and their live quota"),
        (name = "tenants", description = "Limits that all of a tenant's keys count against together"),
        (name = "tiers", description = "The limits, caps and fail mode a key gets by name"),
        (name = "backends", description = "The backend pool: health, add, drain, remove"),
        (name = "billing", description = "Priced usage and billing exports"),
        (name = "cache", description = "The response cache's counters and purges"),
        (name = "alerts", description = "Spend alerts recorded for the fleet"),
        (name = "datasets", description = "Conversations captured for distillation, for tenants and keys that opted in"),
        (name = "audit", description = "The append-only trail of every admin write"),
        (name = "metrics", description = "Prometheus metrics"),
        (name = "console", description = "The admin web console"),
        (name = "meta", description = "Liveness, and this document"),
    ),
    components(schemas(ApiErrorBody)),
    modifiers(&BearerScheme),
)]
struct Base;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut OpenApi) {
        let mut http = Http::new(HttpAuthScheme::Bearer);
        http.description = Some(
            "The admin token (`SLUICE_ADMIN_TOKEN`), or a JWT signed for `[auth.admin_jwt]` \
             whose role claim is `admin` or `viewer`."
                .to_owned(),
        );
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(BEARER, SecurityScheme::Http(http));
    }
}

/// The admin API's document: the handlers' attributes, with those behind `authorize` marked
/// as needing the bearer credential and answering what that middleware and
/// `read_body_within` may answer before the handler runs.
pub(super) fn document() -> OpenApi {
    let Routes {
        public,
        mut guarded,
    } = super::routes();
    for operation in guarded
        .get_openapi_mut()
        .paths
        .paths
        .values_mut()
        .flat_map(operations)
    {
        behind_authorize(operation);
    }
    OpenApiRouter::with_openapi(Base::openapi())
        .merge(public)
        .merge(guarded)
        .into_openapi()
}

fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .flatten()
}

fn behind_authorize(operation: &mut Operation) {
    operation.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
    let mut refusals = vec![
        ("401", "No credential, or not a valid one"),
        (
            "403",
            "The credential's role may not make this call (a viewer writing, or a viewer \
             scoped to a tenant asking for a fleet-wide view)",
        ),
    ];
    if operation.request_body.is_some() {
        refusals.push(("408", "The request body did not arrive in time"));
        refusals.push(("413", "The request body is too large"));
    }
    for (status, description) in refusals {
        let error = ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name(ApiErrorBody::name())))
                    .build(),
            )
            .build();
        operation
            .responses
            .responses
            .entry(status.to_owned())
            .or_insert(error.into());
    }
}

/// The document in JSON, as the route serves it; it depends on the code alone, so it is
/// built once.
fn document_json() -> Bytes {
    static JSON: OnceLock<Bytes> = OnceLock::new();
    JSON.get_or_init(|| {
        Bytes::from(serde_json::to_vec(&document()).expect("the OpenAPI document serializes"))
    })
    .clone()
}

#[utoipa::path(
    get,
    path = "/admin/v1/openapi.json",
    tag = "meta",
    responses((status = 200, description = "This document (OpenAPI 3.1)", body = serde_json::Value)),
)]
pub(super) async fn openapi_json() -> impl IntoResponse {
    (
        [(http::header::CONTENT_TYPE, "application/json")],
        document_json(),
    )
}

#[cfg(test)]
mod tests {
    use crate::app::Gateway;
    use axum::body::Body;
    use http::{Method, Request};
    use std::collections::{BTreeMap, BTreeSet};
    use tower::ServiceExt;

    const ADMIN_TOKEN: &str = "openapi-test-admin-token";

    /// The methods a test sends to each documented path.
    const METHODS: [Method; 8] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
        Method::TRACE,
    ];

    /// The admin router of a gateway on a fresh embedded store.
    async fn admin_router(data_dir: &std::path::Path) -> axum::Router {
        let data_dir = data_dir.to_str().unwrap().to_owned();
        let env = move |name: &str| match name {
            "SLUICE_DATA_DIR" => Some(data_dir.clone()),
            "SLUICE_ADMIN_TOKEN" => Some(ADMIN_TOKEN.to_owned()),
            _ => None,
        };
        let config = crate::config::Config::from_toml("", &env).unwrap();
        let (gateway, _usage_writer) = Gateway::build(config).await.unwrap();
        super::super::router(gateway)
    }

    /// Each documented path template, with its operations' methods and documented answers
    /// (status, and the media types of each).
    fn documented() -> BTreeMap<String, BTreeMap<Method, Operation>> {
        let doc = serde_json::to_value(super::document()).unwrap();
        let mut paths = BTreeMap::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            let mut operations = BTreeMap::new();
            for (method, operation) in item.as_object().unwrap() {
                let method: Method = method.to_uppercase().parse().unwrap();
                let answers = operation["responses"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(status, response)| {
                        let types = response["content"]
                            .as_object()
                            .map(|c| c.keys().cloned().collect())
                            .unwrap_or_default();
                        (status.parse().unwrap(), types)
                    })
                    .collect();
                let operation = Operation {
                    answers,
                    has_body: operation.get("requestBody").is_some(),
                };
                operations.insert(method, operation);
            }
            paths.insert(path.clone(), operations);
        }
        paths
    }

    struct Operation {
        answers: BTreeMap<u16, BTreeSet<String>>,
        has_body: bool,
    }

    /// `template` with each `{param}` filled in: the answer may well be a 404 for a key
    /// that does not exist, but it is the route's own.
    fn concrete(template: &str) -> String {
        template
            .split('/')
            .map(|segment| {
                if segment.starts_with('{') {
                    "openapi-probe"
                } else {
                    segment
                }
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    async fn send(router: &axum::Router, method: Method, path: &str, body: bool) -> Answer {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"));
        let request = if body {
            request = request.header("content-type", "application/json");
            request.body(Body::from("{}")).unwrap()
        } else {
            request.body(Body::empty()).unwrap()
        };
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let media_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap().trim().to_owned());
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        Answer {
            status,
            media_type,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    struct Answer {
        status: u16,
        media_type: Option<String>,
        body: String,
    }

    /// The path templates the router holds, read from its `Debug` output (axum offers no
    /// other way to list them); the fallback's own internal routes are not among them.
    fn served_paths(router: &axum::Router) -> BTreeSet<String> {
        let debug = format!("{router:?}");
        let routes = debug
            .split_once("path_router:")
            .and_then(|(_, rest)| rest.split_once("fallback_router:"))
            .map(|(routes, _)| routes)
            .expect("axum's Router Debug lists path_router before fallback_router");
        routes
            .split('"')
            .skip(1)
            .step_by(2)
            .filter(|quoted| quoted.starts_with('/'))
            .map(str::to_owned)
            .collect()
    }

    #[tokio::test]
    async fn the_router_serves_exactly_the_documented_paths() {
        let dir = tempfile::tempdir().unwrap();
        let router = admin_router(dir.path()).await;
        let documented: BTreeSet<String> = documented().into_keys().collect();
        assert_eq!(
            served_paths(&router),
            documented,
            "every route must be registered with routes!(handler) and a #[utoipa::path]"
        );
    }

    #[tokio::test]
    async fn every_documented_operation_is_served_and_answers_as_documented() {
        let dir = tempfile::tempdir().unwrap();
        let router = admin_router(dir.path()).await;
        let mut wrong = Vec::new();
        for (template, operations) in documented() {
            let path = concrete(&template);
            for (method, operation) in operations {
                let answer = send(&router, method.clone(), &path, operation.has_body).await;
                let call = format!("{method} {path}: {} {}", answer.status, answer.body);
                if answer.body.contains("Unknown admin URL") {
                    wrong.push(format!("{call} (the router's fallback)"));
                    continue;
                }
                let Some(types) = operation.answers.get(&answer.status) else {
                    wrong.push(format!("{call} (status not documented)"));
                    continue;
                };
                if answer
                    .media_type
                    .as_ref()
                    .is_none_or(|t| !types.contains(t))
                {
                    wrong.push(format!(
                        "{call} (content type {:?}, documented {types:?})",
                        answer.media_type
                    ));
                }
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[tokio::test]
    async fn undocumented_methods_on_documented_paths_answer_405() {
        let dir = tempfile::tempdir().unwrap();
        let router = admin_router(dir.path()).await;
        let mut wrong = Vec::new();
        for (template, operations) in documented() {
            let path = concrete(&template);
            for method in METHODS {
                // HEAD is GET without the body: axum serves it wherever GET is.
                let documented = operations.contains_key(&method)
                    || (method == Method::HEAD && operations.contains_key(&Method::GET));
                if documented {
                    continue;
                }
                let answer = send(&router, method.clone(), &path, false).await;
                if answer.status != 405 {
                    wrong.push(format!(
                        "{method} {path}: {} {}",
                        answer.status, answer.body
                    ));
                }
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn the_document_names_itself_and_its_credential() {
        let doc = serde_json::to_value(super::document()).unwrap();
        assert!(
            doc["openapi"].as_str().unwrap().starts_with("3.1"),
            "{}",
            doc["openapi"]
        );
        assert_eq!(doc["info"]["title"], "Sluice admin API");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        // The credential is asked for exactly where `authorize` runs.
        for (path, public) in [
            ("/health", true),
            ("/console", true),
            ("/admin/v1/keys", false),
        ] {
            let security = &doc["paths"][path]["get"]["security"];
            assert_eq!(security.is_null(), public, "{path}: {security}");
        }
    }
}
