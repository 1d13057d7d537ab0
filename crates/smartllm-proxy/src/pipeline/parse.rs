//! Parsing: the body into the API's own request type, the model or route it
//! names, and the virtual key's permission to use it.

use crate::ctx::Ctx;
use crate::runtime::Runtime;
use bytes::BytesMut;
use smartllm_config::{ModelConfig, RouteConfig};
use smartllm_protocol::{parse_request, ApiError, Endpoint, ParsedRequest};

/// A parsed request and what its `model` field resolved to.
pub struct Parsed<'rt> {
    pub req: ParsedRequest,
    /// The model named (or a route's default model).
    pub model: &'rt ModelConfig,
    /// The route named, if any.
    pub route: Option<&'rt RouteConfig>,
    /// The route, when the router chooses the model per request.
    pub routed: Option<&'rt RouteConfig>,
}

pub fn parse<'rt>(
    ctx: &mut Ctx,
    rt: &'rt Runtime,
    endpoint: Endpoint,
    body: BytesMut,
) -> Result<Parsed<'rt>, ApiError> {
    let req = if endpoint.is_anthropic() {
        smartllm_protocol::messages::parse(endpoint, body.freeze())?
    } else {
        let mut req = parse_request(endpoint, &body)?;
        // Kept to send on as it came (see `ParsedRequest::upstream_body`).
        req.native = Some(body.freeze());
        req
    };
    resolve(ctx, rt, req)
}

/// The model or route a parsed request names, and the key's permission to use it.
pub fn resolve<'rt>(
    ctx: &mut Ctx,
    rt: &'rt Runtime,
    req: ParsedRequest,
) -> Result<Parsed<'rt>, ApiError> {
    ctx.stream = req.stream;
    ctx.web_search = req.endpoint == smartllm_protocol::Endpoint::ChatCompletions
        && req.body.contains_key("web_search_options");
    if ctx.tag.is_none() {
        ctx.tag = req
            .body
            .get("metadata")
            .and_then(|m| m.get("tag"))
            .and_then(serde_json::Value::as_str)
            .and_then(smartllm_ledger::clean_tag);
    }
    let Some((model, route)) = rt.config.resolve_model(&req.model) else {
        // A key held to some models is told those, as `GET /v1/models`
        // shows it, not every model and alias of the gateway.
        if let Some(vk) = ctx.key.as_ref().filter(|k| !k.models.is_empty()) {
            let mine: Vec<String> = vk
                .models
                .iter()
                .filter(|m| rt.config.resolve_model(m).is_some())
                .cloned()
                .collect();
            return Err(ApiError::model_not_found(&req.model, &mine));
        }
        // With the names aliases' `match` patterns take.
        let mut known = rt.known_models.clone();
        for r in rt.config.routes.values() {
            known.extend(r.patterns.iter().map(|p| format!("{p} (as {})", r.name)));
        }
        return Err(ApiError::model_not_found(&req.model, &known));
    };
    ctx.route = route.map(|r| r.name.clone());
    let routed = route.filter(|r| r.is_routed());
    if routed.is_none() {
        ctx.set_model(&model.name);
        ctx.route_reason = "alias".into();
    }
    // A name an alias's `match` pattern took is that alias for keys'
    // model lists.
    let named = route.map_or(req.model.as_str(), |r| r.name.as_str());
    crate::auth::authorize_model(
        ctx,
        named,
        if routed.is_some() { named } else { &model.name },
    )?;
    if routed.is_some() {
        ctx.route_reason = "cache".into();
    }
    Ok(Parsed {
        req,
        model,
        route,
        routed,
    })
}
